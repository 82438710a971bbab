//! Traces on disk, so they can be replayed (`tandem train-drafter --traces DIR`).
//!
//! One safetensors file per trace, `trace-<n>.safetensors`, holding:
//! - `tokens` u32 [n_tokens]; `prompt_len` u32 [1]; `features` f32 [positions, feature_size];
//! - `soft_offsets` u32 [positions + 1], `soft_ids` u32 [m], `soft_probs` f32 [m]: position t's
//!   top entries are `soft_*[soft_offsets[t]..soft_offsets[t + 1]]` (none: the next token is the label);
//! - `rejected` u32 [r, 3]: rows (pos, token, depth);
//! - `final_hidden` f32 [positions, hidden], when recorded: the target's last residual stream;
//! - `version_id` i64 [1] and `version_family` u8 [len] (UTF-8), for a weight version's trace.
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tandem_engine::online::{Rejection, Trace, TraceVersion};
use tandem_models::{ModelError, Result};

/// A trace's tensors, named as the module comment says.
fn trace_tensors(trace: &Trace) -> Result<HashMap<String, Tensor>> {
    let cpu = &Device::Cpu;
    let n = trace.positions();
    let mut t = HashMap::new();
    t.insert("tokens".to_string(), Tensor::new(trace.tokens.as_slice(), cpu)?);
    t.insert("prompt_len".to_string(), Tensor::new(&[trace.prompt_len as u32], cpu)?);
    t.insert("features".to_string(), Tensor::from_slice(&trace.features, (n, trace.feature_size), cpu)?);
    let mut offsets = vec![0u32];
    let (mut ids, mut probs) = (Vec::new(), Vec::new());
    for p in 0..n {
        for &(id, pr) in trace.soft.get(p).map(|v| v.as_slice()).unwrap_or(&[]) {
            ids.push(id);
            probs.push(pr);
        }
        offsets.push(ids.len() as u32);
    }
    t.insert("soft_offsets".to_string(), Tensor::new(offsets, cpu)?);
    t.insert("soft_ids".to_string(), Tensor::new(ids, cpu)?);
    t.insert("soft_probs".to_string(), Tensor::new(probs, cpu)?);
    let rej: Vec<u32> = trace.rejected.iter().flat_map(|r| [r.pos as u32, r.token, r.depth as u32]).collect();
    t.insert("rejected".to_string(), Tensor::from_vec(rej, (trace.rejected.len(), 3), cpu)?);
    if trace.final_size() > 0 {
        let last = Tensor::from_slice(&trace.final_hidden, (n, trace.final_size()), cpu)?;
        t.insert("final_hidden".to_string(), last);
    }
    if let Some(v) = &trace.version {
        t.insert("version_id".to_string(), Tensor::new(&[v.id as i64], cpu)?);
        t.insert("version_family".to_string(), Tensor::new(v.family.as_bytes(), cpu)?);
    }
    Ok(t)
}

pub fn save_trace(trace: &Trace, path: &Path) -> Result<()> {
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&trace_tensors(trace)?, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::checkpoint(path, e))
}

/// A trace as the bytes of a safetensors file, for a broker: what `save_trace` writes, with the
/// hidden states (`features`, `final_hidden`: nearly all of its bytes) in bf16, as EAGLE-3
/// trainers ship them; labels and tokens stay exact. Half the bytes to encode, send and store.
pub fn encode_trace(trace: &Trace) -> Result<Vec<u8>> {
    let mut tensors = trace_tensors(trace)?;
    for name in ["features", "final_hidden"] {
        if let Some(t) = tensors.get_mut(name) {
            *t = t.to_dtype(candle_core::DType::BF16)?;
        }
    }
    safetensors08::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| ModelError::Drafter(format!("encoding a trace: {e}")))
}

pub fn load_trace(path: &Path) -> Result<Trace> {
    let t = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| ModelError::checkpoint(path, e))?;
    trace_from(t, path)
}

/// A trace from `encode_trace`'s bytes; `origin` names them in errors.
pub fn decode_trace(bytes: &[u8], origin: &str) -> Result<Trace> {
    let path = Path::new(origin);
    let t = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| ModelError::checkpoint(path, e))?;
    trace_from(t, path)
}

fn trace_from(t: HashMap<String, Tensor>, path: &Path) -> Result<Trace> {
    let get = |name: &str| t.get(name).ok_or_else(|| ModelError::checkpoint(path, format!("trace lacks `{name}`")));
    // Hidden states may come in bf16 (`encode_trace`): read as f32.
    let features = get("features")?.to_dtype(candle_core::DType::F32)?;
    let (n, feature_size) = features.dims2()?;
    let offsets = get("soft_offsets")?.to_vec1::<u32>()?;
    let ids = get("soft_ids")?.to_vec1::<u32>()?;
    let probs = get("soft_probs")?.to_vec1::<f32>()?;
    if offsets.len() != n + 1 || ids.len() != probs.len() || offsets.last().copied() != Some(ids.len() as u32) {
        return Err(ModelError::checkpoint(path, "soft label offsets do not match"));
    }
    let soft = (0..n)
        .map(|p| {
            let r = offsets[p] as usize..offsets[p + 1] as usize;
            ids[r.clone()].iter().copied().zip(probs[r].iter().copied()).collect()
        })
        .collect();
    let rejected = get("rejected")?
        .to_vec2::<u32>()?
        .into_iter()
        .map(|r| Rejection { pos: r[0] as usize, token: r[1], depth: r[2] as usize })
        .collect();
    let final_hidden = match t.get("final_hidden") {
        Some(f) if f.dims2()?.0 == n => f.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        Some(_) => return Err(ModelError::checkpoint(path, "final_hidden does not cover the positions")),
        None => Vec::new(),
    };
    let version = match (t.get("version_id"), t.get("version_family")) {
        (Some(id), Some(family)) => {
            let family = String::from_utf8(family.to_vec1::<u8>()?)
                .map_err(|_| ModelError::checkpoint(path, "version_family is not UTF-8"))?;
            Some(TraceVersion { family: family.into(), id: id.to_vec1::<i64>()?[0] as u64 })
        }
        _ => None,
    };
    Ok(Trace {
        tokens: get("tokens")?.to_vec1::<u32>()?,
        prompt_len: get("prompt_len")?.to_vec1::<u32>()?[0] as usize,
        feature_size,
        features: features.flatten_all()?.to_vec1::<f32>()?,
        soft,
        final_hidden,
        rejected,
        version,
        skipped: 0,
    })
}

/// Every `*.safetensors` trace in `dir`, in name order.
pub fn trace_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::checkpoint(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// Every trace in `dir`, in name order (an error names the file that failed).
pub fn load_dir(dir: &Path) -> Result<Vec<Trace>> {
    trace_files(dir)?.iter().map(|f| load_trace(f)).collect()
}

/// Writes traces into a folder, numbering them from where it left off.
pub struct TraceSpill {
    dir: PathBuf,
    next: usize,
}

impl TraceSpill {
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::checkpoint(dir, e))?;
        let next = trace_files(dir)?.len();
        Ok(TraceSpill { dir: dir.to_path_buf(), next })
    }

    pub fn write(&mut self, trace: &Trace) -> Result<()> {
        let path = self.dir.join(format!("trace-{:08}.safetensors", self.next));
        self.next += 1;
        save_trace(trace, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let trace = Trace {
            tokens: vec![5, 6, 7, 8],
            prompt_len: 2,
            feature_size: 3,
            features: (0..9).map(|i| i as f32 * 0.5).collect(),
            soft: vec![vec![], vec![(7, 0.5), (1, 0.25)], vec![(8, 0.9)]],
            final_hidden: (0..6).map(|i| i as f32 - 2.5).collect(),
            rejected: vec![Rejection { pos: 2, token: 3, depth: 1 }],
            version: Some(TraceVersion { family: "run-7".into(), id: 12 }),
            skipped: 0,
        };
        let dir = std::env::temp_dir().join(format!("tandem-trace-{}", std::process::id()));
        let mut spill = TraceSpill::new(&dir).unwrap();
        spill.write(&trace).unwrap();
        let files = trace_files(&dir).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(load_trace(&files[0]).unwrap(), trace);
        // The broker's form: hidden states rounded to bf16 (these values are exact in bf16).
        assert_eq!(decode_trace(&encode_trace(&trace).unwrap(), "bytes").unwrap(), trace);
        let fine = Trace { features: vec![0.1, 0.2, 0.3, 1e-3, 2e-3, 3e-3, 5.0, 6.0, 7.0], ..trace.clone() };
        let back = decode_trace(&encode_trace(&fine).unwrap(), "bytes").unwrap();
        for (a, b) in back.features.iter().zip(&fine.features) {
            assert!((a - b).abs() <= b.abs() / 128.0, "bf16 keeps 8 bits of mantissa: {a} vs {b}");
        }
        assert!(decode_trace(b"not a trace", "bytes").is_err());
        // Traces recorded without the last stream (or of the served model) still load.
        let old = Trace { final_hidden: Vec::new(), version: None, ..trace };
        spill.write(&old).unwrap();
        assert_eq!(load_trace(&trace_files(&dir).unwrap()[1]).unwrap(), old);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
