//! Shared by tandem-train's integration tests: the tiny random checkpoints, generated once per
//! test binary by tests/reference/make_tiny.py.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tandem_models::{load, LoadOptions, Model};

pub fn tiny_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = std::env::temp_dir().join(format!("tandem-train-tiny-{}", std::process::id()));
        let ok = Command::new("python3").arg(root.join("tests/reference/make_tiny.py")).arg(&dir).status().unwrap();
        assert!(ok.success(), "make_tiny.py failed");
        dir
    })
}

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
