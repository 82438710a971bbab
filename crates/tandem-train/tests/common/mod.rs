//! Shared by tandem-train's integration tests: the tiny random checkpoints (tandem-testkit) and
//! the default SmolLM2 file.
#![allow(dead_code)]
use std::path::PathBuf;
use tandem_models::{load, LoadOptions, Model};

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

pub fn tiny(name: &str) -> Model {
    load(&tiny_dir().join(name), &LoadOptions::default(), &mut |_, _| {}).unwrap().model
}
