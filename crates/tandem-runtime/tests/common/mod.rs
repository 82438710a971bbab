//! What the runtime's tests share.
use std::path::PathBuf;

/// A default model's file in the model cache (`TANDEM_CACHE`, else ~/.cache/tandem/models).
pub fn model_file(name: &str) -> PathBuf {
    let dir = match std::env::var_os("TANDEM_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tandem/models"),
    };
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-models.sh (CI does)", p.display());
    p
}
