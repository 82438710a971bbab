//! tandem-models: checkpoint loading (GGUF, HF safetensors), tokenizers, and the transformer
//! forward pass over a caller-owned KV cache.
pub mod config;
pub mod error;
pub mod eval;
pub mod kv_cache;
pub mod latent;
pub mod linear;
pub mod loader;
pub mod lora;
pub mod model;
pub mod ops;
pub mod tokenizer;
pub mod weights;

pub use candle_core::Device;
pub use config::{Architecture, KvDtype, ModelConfig};
pub use error::{ModelError, Result};
pub use kv_cache::{KvCache, KvSnapshot, KvUsage, BLOCK};
pub use loader::{load, LoadedModel};
pub use lora::{Adapter, LoraSpec, LoraTargets};
pub use model::{ForwardOutput, LoadOptions, LogitsFor, Model, SequenceInput, WeightDtype};
pub use ops::OpsPath;
pub use tokenizers::Tokenizer;
