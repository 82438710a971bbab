//! Perplexity through the serving forward (the KV cache and the kernels that serve), so it
//! measures the model as served: a latent model's attention included.
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::model::{LogitsFor, Model, SequenceInput};
use crate::ops::kernels::log_sum_exp;

/// Negative log-likelihood summed over every position after each window's first, windows of
/// `window` tokens one after another (a last partial window counts too), and the number of
/// positions scored.
pub fn negative_log_likelihood(
    model: &Model,
    tokens: &[u32],
    window: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(f64, usize)> {
    let mut cache = KvCache::new(&model.config, 1, window.max(2), model.device())?;
    let (mut total, mut count) = (0f64, 0usize);
    let windows: Vec<&[u32]> = tokens.chunks(window).filter(|w| w.len() > 1).collect();
    for (i, ids) in windows.iter().enumerate() {
        cache.reset(0)?;
        let input = SequenceInput { slot: 0, tokens: ids, logits: LogitsFor::All, siblings: &[] };
        let rows: Vec<Vec<f32>> = model.forward(&[input], &mut cache, &[])?.logits.to_vec2()?;
        for (row, &next) in rows.iter().zip(&ids[1..]) {
            total += (log_sum_exp(row) - row[next as usize]) as f64;
            count += 1;
        }
        progress(i + 1, windows.len());
    }
    Ok((total, count))
}

/// exp(mean negative log-likelihood).
pub fn perplexity(nll: f64, count: usize) -> f64 {
    (nll / count.max(1) as f64).exp()
}
