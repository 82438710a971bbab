//! Errors of checkpoint loading and model execution.
//!
//! Every load error names the file it came from, so that a user with a broken download
//! knows which file to replace.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    WrongShape { path: PathBuf, name: String, actual: Vec<usize>, expected: Vec<usize> },

    #[error("{path}: unsupported architecture `{arch}` (supported: llama, qwen2, qwen3)")]
    UnknownArchitecture { path: PathBuf, arch: String },

    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("invalid batch: {0}")]
    InvalidBatch(String),

    #[error("drafter: {0}")]
    Drafter(String),

    #[error("adapter: {0}")]
    Adapter(String),

    #[error("KV cache: {0}")]
    KvCache(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        ModelError::Checkpoint { path: path.into(), message: message.to_string() }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
