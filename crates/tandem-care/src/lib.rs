//! tandem-care: converts a GQA model's key and value projections into low-rank latent form
//! (CARE, arXiv 2603.17946, and the baselines it is compared with), so the KV cache holds
//! r_K + r_V numbers per token and layer instead of 2·kv_heads·head_dim.
//!
//! The pipeline: `calibrate` runs real text through the original model and sums each layer's
//! uncentred covariance C = XᵀX of the attention input; `spectra` decomposes each layer's W_K and
//! W_V under the method's whitening (`factor`); `convert` picks per-layer ranks (`allocate`) and
//! builds the latent model, which tandem serves with a cache of the latents' width.
pub mod allocate;
pub mod factor;
pub mod heal;
pub mod text;

pub use allocate::Allocation;
pub use factor::{Method, Spectrum, Whitening};

use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use tandem_models::model::LatentFactors;
use tandem_models::{Model, ModelError};

type Result<T> = std::result::Result<T, ModelError>;

/// A Python file that loads a converted folder into Hugging Face transformers (written into
/// every folder `tandem convert care` makes; `tests/convert.rs` runs it).
pub const TRANSFORMERS_LOADER: &str = include_str!("modeling_tandem_latent.py");
pub const TRANSFORMERS_LOADER_FILE: &str = "modeling_tandem_latent.py";

/// Writes a converted model as a Hugging Face folder: `loader::save_hf` (safetensors,
/// config.json with `latent_kv` and `provenance` merged in, tokenizer) and the transformers loader.
pub fn save(
    loaded: &tandem_models::LoadedModel,
    converted: &Model,
    provenance: serde_json::Value,
    out: &std::path::Path,
) -> Result<()> {
    tandem_models::loader::save_hf(loaded, converted, provenance, out)?;
    std::fs::write(out.join(TRANSFORMERS_LOADER_FILE), TRANSFORMERS_LOADER).map_err(|e| ModelError::checkpoint(out, e))
}

/// The paper's default calibration: 256 windows of 32 tokens.
pub const DEFAULT_WINDOW: usize = 32;
pub const DEFAULT_TOKENS: usize = 8192;

/// `count` windows of `window` tokens from `tokens` at offsets drawn with a fixed seed (the same
/// text gives the same calibration).
pub fn windows(tokens: &[u32], window: usize, count: usize) -> std::result::Result<Vec<Vec<u32>>, String> {
    if tokens.len() < window || window == 0 {
        return Err(format!("the calibration text has {} tokens, fewer than one window of {window}", tokens.len()));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    Ok((0..count)
        .map(|_| {
            let at = rng.random_range(0..=tokens.len() - window);
            tokens[at..at + window].to_vec()
        })
        .collect())
}

/// Each layer's uncentred covariance of the attention input over the calibration tokens.
pub struct Calibration {
    pub covariances: Vec<DMatrix<f64>>,
    pub tokens: usize,
}

/// Windows per forward of the calibration pass.
const CALIBRATION_BATCH: usize = 32;

/// Runs `windows` through the original model (batches of whole windows; only the covariance
/// sums are kept, one hidden x hidden matrix per layer); `progress(done, total)` per batch.
pub fn calibrate(model: &Model, windows: &[Vec<u32>], progress: &mut dyn FnMut(usize, usize)) -> Result<Calibration> {
    let (layers, hidden) = (model.config.num_layers, model.config.hidden_size);
    let mut covariances = vec![DMatrix::<f64>::zeros(hidden, hidden); layers];
    let batches: Vec<&[Vec<u32>]> = windows.chunks(CALIBRATION_BATCH).collect();
    for (i, batch) in batches.iter().enumerate() {
        let seqs: Vec<&[u32]> = batch.iter().map(|w| w.as_slice()).collect();
        let mut observe = |l: usize, h: &Tensor| -> Result<()> {
            let h = h.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            let xtx: Vec<f32> = h.t()?.matmul(&h)?.flatten_all()?.to_vec1()?;
            for (c, &v) in covariances[l].as_mut_slice().iter_mut().zip(&xtx) {
                *c += v as f64;
            }
            Ok(())
        };
        model.observe_attention_inputs(&seqs, &mut observe)?;
        progress(i + 1, batches.len());
    }
    Ok(Calibration { covariances, tokens: windows.iter().map(Vec::len).sum() })
}

/// One layer's K and V decompositions.
pub struct LayerSpectra {
    pub k: Spectrum,
    pub v: Spectrum,
}

/// A tensor [rows, cols] as an f64 matrix.
fn matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (r, c) = t.dims2()?;
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(DMatrix::from_row_iterator(r, c, v.into_iter().map(f64::from)))
}

fn tensor(m: &DMatrix<f64>, device: &Device) -> Result<Tensor> {
    let rows: Vec<f32> = m.transpose().as_slice().iter().map(|&v| v as f32).collect(); // row-major
    Ok(Tensor::from_vec(rows, (m.nrows(), m.ncols()), device)?)
}

/// Every layer's K and V spectra under `method` (K and V share the layer's covariance);
/// `progress(done, total)` per layer.
pub fn spectra(
    model: &Model,
    calibration: &Calibration,
    method: Method,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerSpectra>> {
    let layers = model.config.num_layers;
    let mut out = Vec::with_capacity(layers);
    for (l, c) in calibration.covariances.iter().enumerate() {
        let kv = model.kv_projections(l)?;
        let white = Whitening::new(method, c, calibration.tokens);
        // [kv, hidden] weights -> W [hidden, kv] (x·W).
        let (wk, wv) = (matrix(&kv.k)?.transpose(), matrix(&kv.v)?.transpose());
        out.push(LayerSpectra { k: Spectrum::new(&wk, &white), v: Spectrum::new(&wv, &white) });
        progress(l + 1, layers);
    }
    Ok(out)
}

/// A converted model and what the conversion predicts about it.
pub struct Conversion {
    pub model: Model,
    pub k_ranks: Vec<usize>,
    pub v_ranks: Vec<usize>,
    /// Per layer: the share of the whitened energy the factors drop (tail / total), K and V.
    pub dropped: Vec<(f64, f64)>,
}

impl Conversion {
    /// KV cache bytes per token of the converted model over the original's.
    pub fn kv_ratio(&self, original: &Model) -> f64 {
        original.config.kv_bytes_per_token() as f64 / self.model.config.kv_bytes_per_token() as f64
    }
}

/// The model with every layer's K and V replaced by its factors at average rank `rank`.
pub fn convert(model: &Model, spectra: &[LayerSpectra], rank: usize, allocation: Allocation) -> Result<Conversion> {
    let max = model.config.kv_size();
    if rank == 0 || rank > max {
        return Err(ModelError::Adapter(format!("rank {rank} is outside 1..={max} (the K/V width)")));
    }
    let k_ranks = allocate::ranks(&spectra.iter().map(|s| &s.k).collect::<Vec<_>>(), rank, allocation);
    let v_ranks = allocate::ranks(&spectra.iter().map(|s| &s.v).collect::<Vec<_>>(), rank, allocation);
    let device = model.device().clone();
    let mut factors = Vec::with_capacity(spectra.len());
    let mut dropped = Vec::with_capacity(spectra.len());
    for (s, (&rk, &rv)) in spectra.iter().zip(k_ranks.iter().zip(&v_ranks)) {
        let ((ka, kb), (va, vb)) = (s.k.factors(rk), s.v.factors(rv));
        factors.push(LatentFactors {
            k_a: tensor(&ka, &device)?,
            k_b: tensor(&kb, &device)?,
            v_a: tensor(&va, &device)?,
            v_b: tensor(&vb, &device)?,
        });
        let share = |sp: &Spectrum, r: usize| sp.tail_energy(r) / sp.energy().max(f64::MIN_POSITIVE);
        dropped.push((share(&s.k, rk), share(&s.v, rv)));
    }
    Ok(Conversion { model: model.with_latent_kv(&factors)?, k_ranks, v_ranks, dropped })
}
