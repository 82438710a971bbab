//! Shared by tandem-train's integration tests: the tiny random checkpoints (tandem-testkit) and
//! the default SmolLM2 file.
#![allow(dead_code)]
use std::path::PathBuf;
use tandem_models::{load, KvDtype, LoadOptions, Model};

pub use tandem_testkit::tiny_dir;

/// The default SmolLM2 GGUF from the model cache (scripts/fetch-models.sh).
pub fn smollm2_file() -> PathBuf {
    let cache = std::env::var_os("TANDEM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tandem/models"));
    let file = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(file.exists(), "{} is missing: run scripts/fetch-models.sh (CI does)", file.display());
    file
}

/// Loading with an f32 KV cache: these tests compare f32 computations (gradients against candle's
/// autograd, a model against its export) whose keys may differ by an ulp, which a rounding cache
/// would turn into a whole f16 step. The f16 cache has its own tests (`training_forward_equals_
/// serving_bit_for_bit`, the latent model's training).
pub fn f32_cache() -> LoadOptions {
    LoadOptions { kv_dtype: KvDtype::F32, ..Default::default() }
}

/// A tiny checkpoint with an f32 KV cache (`f32_cache`).
pub fn tiny(name: &str) -> Model {
    load(&tiny_dir().join(name), &f32_cache(), &mut |_, _| {}).unwrap().model
}
