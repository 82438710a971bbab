//! The default models: where they are cached and how they are fetched (scripts/fetch-models.sh,
//! embedded so the installed binary can fetch without the source tree).
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN_CODER_FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
const FETCH_SCRIPT: &str = include_str!("../../../scripts/fetch-models.sh");

/// `$TANDEM_CACHE`, else `~/.cache/tandem/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/tandem/models")
}

/// Where tandem keeps what it makes (training checkpoints, exports): `$TANDEM_DATA`, else
/// `$XDG_DATA_HOME/tandem`, else `~/.local/share/tandem` (never the directory it was started in).
pub fn data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_DATA") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("tandem");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/tandem")
}

/// Fetches (or verifies) default models into the cache: `which` is `smollm2`, `qwen-coder` or
/// `all`.
pub fn fetch(which: &str) -> Result<()> {
    let dir = cache_dir();
    let status = Command::new("bash")
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .arg("fetch-models.sh")
        .arg(&dir)
        .arg(which)
        .status()
        .context("running bash for the model fetch script")?;
    if !status.success() {
        bail!("fetching models into {} failed ({status})", dir.display());
    }
    Ok(())
}

/// The path of a default model (by short name), fetching only that one when it is not cached.
pub fn default_model(name: &str) -> Result<PathBuf> {
    let file = match name {
        "smollm2" => SMOLLM2_FILE,
        "qwen-coder" => QWEN_CODER_FILE,
        other => bail!("no default model is called `{other}` (smollm2 or qwen-coder)"),
    };
    let path = cache_dir().join(file);
    if !path.exists() {
        eprintln!("{} is not cached yet; fetching it", path.display());
        fetch(name)?;
    }
    Ok(path)
}

/// Resolves a --model value: a path, one of the short names `smollm2` / `qwen-coder`, or a
/// Hugging Face repository `org/name` (`org/name:file.gguf` for one GGUF file of it).
pub fn resolve(model: Option<&str>) -> Result<PathBuf> {
    match model {
        None | Some("smollm2") => default_model("smollm2"),
        Some("qwen-coder") | Some("qwen2.5-coder") => default_model("qwen-coder"),
        Some(spec) if crate::hub::is_repo_id(spec) => crate::hub::resolve(spec),
        Some(p) => Ok(PathBuf::from(p)),
    }
}
