//! Traces from plain text, so a drafter can learn the target before it serves.
//!
//! The target reads each chunk of text once (a prefill, far cheaper per token than decoding), and
//! the chunk becomes a trace whose every position is a prompt position: the features the drafter
//! reads, and the target's last residual stream, from which a trainer holding the target's head
//! (`Trainer::with_target_head`) labels every position with the target's own distribution. A few
//! minutes of this give the drafter more positions than hours of served traffic would.
use candle_core::{DType, Tensor};
use tandem_engine::online::Trace;
use tandem_models::{KvCache, LogitsFor, Model, Result, SequenceInput};

/// One trace per chunk of token ids, `batch` chunks per forward. `done(n)` is called after every
/// forward with the number of chunks it read (for progress bars).
pub fn text_traces(
    model: &Model,
    target_layers: &[usize],
    chunks: &[Vec<u32>],
    batch: usize,
    mut done: impl FnMut(usize),
) -> Result<Vec<Trace>> {
    let longest = chunks.iter().map(Vec::len).max().unwrap_or(0);
    let batch = batch.clamp(1, chunks.len().max(1));
    let mut out = Vec::with_capacity(chunks.len());
    if longest == 0 {
        return Ok(out);
    }
    let mut cache = KvCache::new(&model.config, batch, longest, model.device())?;
    // The drafter's layers, then the last residual stream (for the labels).
    let mut layers = target_layers.to_vec();
    layers.push(model.config.num_layers - 1);
    let floats = |t: Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    for group in chunks.chunks(batch) {
        for slot in 0..group.len() {
            cache.reset(slot)?;
        }
        let inputs: Vec<SequenceInput> = group
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.is_empty())
            .map(|(slot, c)| SequenceInput { slot, tokens: c, logits: LogitsFor::None, siblings: &[] })
            .collect();
        if inputs.is_empty() {
            continue;
        }
        let fwd = model.forward(&inputs, &mut cache, &layers)?;
        let (feature_layers, last) = fwd.hidden.split_at(target_layers.len());
        let mut row = 0;
        for seq in &inputs {
            let n = seq.tokens.len();
            let rows = feature_layers.iter().map(|h| h.narrow(0, row, n)).collect::<candle_core::Result<Vec<_>>>()?;
            let features = floats(Tensor::cat(&rows, 1)?)?;
            let final_hidden = floats(last[0].narrow(0, row, n)?)?;
            out.push(Trace {
                tokens: seq.tokens.to_vec(),
                prompt_len: n,
                feature_size: features.len() / n,
                features,
                soft: vec![Vec::new(); n],
                final_hidden,
                rejected: Vec::new(),
                version: None,
                skipped: 0,
            });
            row += n;
        }
        done(group.len());
    }
    Ok(out)
}
