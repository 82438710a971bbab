//! Shared helpers of tandem-models' integration tests: the tiny checkpoints, the default model
//! files and the Python reference.
#![allow(dead_code)]
use candle_core::Tensor;
use std::path::{Path, PathBuf};
use std::process::Command;
use tandem_models::{load, LoadOptions, LoadedModel};

#[allow(unused_imports)]
pub use tandem_testkit::{python, repo_root, tiny_dir, TINY};

pub fn models_dir() -> PathBuf {
    match std::env::var_os("TANDEM_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tandem/models"),
    }
}

/// A default model file; fails with instructions when it has not been fetched.
pub fn model_file(name: &str) -> PathBuf {
    let p = models_dir().join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-models.sh (CI does)", p.display());
    p
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN_CODER: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// Load options with an f32 KV cache: the reference tests compare f32 computations (an f16
/// cache is compared with a reference that rounds alike, `reference_logits_kv`).
pub fn f32_cache() -> LoadOptions {
    LoadOptions { kv_dtype: tandem_models::KvDtype::F32, ..Default::default() }
}

/// A checkpoint with an f32 KV cache (`f32_cache`).
pub fn load_path(path: &Path) -> LoadedModel {
    load(path, &f32_cache(), &mut |_, _| {}).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// A GGUF file with its block-quantized weights kept as they are (the serving default), with an
/// f32 KV cache (`f32_cache`).
pub fn load_quantized(path: &Path) -> LoadedModel {
    let opts = LoadOptions { keep_quantized: true, ..f32_cache() };
    load(path, &opts, &mut |_, _| {}).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// Both default models as served by default (quantized blocks), and SmolLM2 dequantized to f32.
pub fn default_models() -> Vec<(String, LoadedModel)> {
    vec![
        ("SmolLM2 f32".into(), load_path(&model_file(SMOLLM2))),
        ("SmolLM2 quantized".into(), load_quantized(&model_file(SMOLLM2))),
        ("Qwen2.5-Coder quantized".into(), load_quantized(&model_file(QWEN_CODER))),
        ("SmolLM2 quantized, f16 KV cache".into(), {
            let opts =
                LoadOptions { keep_quantized: true, kv_dtype: tandem_models::KvDtype::F16, ..Default::default() };
            load(&model_file(SMOLLM2), &opts, &mut |_, _| {}).unwrap()
        }),
    ]
}

/// Logits of every position of `tokens` from the numpy reference.
pub fn reference_logits(checkpoint: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    reference_logits_kv(checkpoint, tokens, "f32")
}

/// `reference_logits` with keys and values rounded as a KV cache of `kv_dtype` ("f32", "f16")
/// holds them.
pub fn reference_logits_kv(checkpoint: &Path, tokens: &[u32], kv_dtype: &str) -> Vec<Vec<f32>> {
    let out = std::env::temp_dir().join(format!("tandem-ref-{}-{}.npy", std::process::id(), rand_suffix()));
    let gguf = checkpoint.extension().is_some_and(|e| e == "gguf");
    tandem_testkit::require_python(if gguf { &["numpy", "gguf"] } else { &["numpy"] });
    let toks: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let o = Command::new(python())
        .arg(repo_root().join("tests/reference/reference.py"))
        .arg(checkpoint)
        .arg(toks.join(","))
        .arg(&out)
        .arg(kv_dtype)
        .output()
        .expect("python3 runs");
    assert!(o.status.success(), "reference.py failed: {}", String::from_utf8_lossy(&o.stderr));
    let t = Tensor::read_npy(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    t.to_vec2::<f32>().unwrap()
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// max |a - b| / max |b|.
pub fn relative_error(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len(), "row count");
    let mut max_diff = 0f64;
    let mut max_ref = 0f64;
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len(), "row length");
        for (&x, &y) in ra.iter().zip(rb) {
            max_diff = max_diff.max((x as f64 - y as f64).abs());
            max_ref = max_ref.max((y as f64).abs());
        }
    }
    max_diff / max_ref
}
