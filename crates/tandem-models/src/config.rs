//! The shape of a decoder-only transformer, read from an HF config.json or GGUF metadata.
use crate::error::{ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// What the KV cache stores per key and value number. f16 (llama.cpp's default) halves the
/// cache's memory, so a budget holds twice the tokens, and the bytes a decode step reads over a
/// long context (SmolLM2 Q4_1 at depth 4,096: a step ~21% shorter, docs/kv-cache.md); keys
/// and values are rounded once, when written, and attention's arithmetic stays f32. A CARE latent
/// model's cache holds its key and value latents rounded likewise. f32 stays the default until
/// every reference test that checks f32 numerics names its cache type (docs/kv-cache.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            KvDtype::F32 => candle_core::DType::F32,
            KvDtype::F16 => candle_core::DType::F16,
        }
    }

    pub fn bytes(self) -> usize {
        self.dtype().size_in_bytes()
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// GGUF llama files store q/k rows permuted for llama.cpp's interleaved ("normal") rope;
    /// HF checkpoints and GGUF qwen2 use the rotate-half ("neox") pairing.
    pub rope_interleaved: bool,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (always in Qwen2; optional in Llama).
    pub attention_bias: bool,
    /// Per-head RMSNorm on q and k before rope (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Keys and values through low-rank factors (a CARE conversion, `tandem convert care`).
    pub latent_kv: Option<LatentKv>,
    /// What the KV cache holds (a load option, not the checkpoint's: `LoadOptions::kv_dtype`).
    pub kv_dtype: KvDtype,
}

/// Per-layer ranks of factored key and value projections: layer l computes a latent of
/// `k_ranks[l]` (`v_ranks[l]`) numbers per token from the normed hidden state, caches it, and
/// expands it to keys (values) at attention time. config.json key `latent_kv`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct LatentKv {
    pub k_ranks: Vec<usize>,
    pub v_ranks: Vec<usize>,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    rope_scaling: Option<serde_json::Value>,
    hidden_act: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<EosIds>,
    latent_kv: Option<LatentKv>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EosIds {
    One(u32),
    Many(Vec<u32>),
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl ModelConfig {
    /// Parses an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::checkpoint(path, e))?;
        let hf: HfConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::checkpoint(path, format!("invalid config.json: {e}")))?;
        let arch_name = hf.model_type.clone().or_else(|| hf.architectures.first().cloned()).unwrap_or_default();
        let architecture = match arch_name.to_lowercase().as_str() {
            "llama" | "llamaforcausallm" => Architecture::Llama,
            "qwen2" | "qwen2forcausallm" => Architecture::Qwen2,
            "qwen3" | "qwen3forcausallm" => Architecture::Qwen3,
            _ => return Err(ModelError::UnknownArchitecture { path: path.into(), arch: arch_name }),
        };
        if let Some(scaling) = &hf.rope_scaling {
            let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|v| v.as_str()).unwrap_or("");
            if !scaling.is_null() && kind != "default" {
                return Err(ModelError::checkpoint(path, format!("rope_scaling type `{kind}` is not supported yet")));
            }
        }
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(ModelError::checkpoint(path, format!("hidden_act `{act}` is not supported (only silu)")));
            }
        }
        if hf.num_attention_heads == 0 || !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
            return Err(ModelError::checkpoint(path, "hidden_size must be a multiple of num_attention_heads"));
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if num_kv_heads == 0 || !hf.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(ModelError::checkpoint(path, "num_attention_heads must be a multiple of num_key_value_heads"));
        }
        let eos_token_ids = match hf.eos_token_id {
            Some(EosIds::One(id)) => vec![id],
            Some(EosIds::Many(ids)) => ids,
            None => vec![],
        };
        let config = ModelConfig {
            architecture,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads),
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope_interleaved: false,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            attention_bias: architecture == Architecture::Qwen2 || hf.attention_bias,
            qk_norm: architecture == Architecture::Qwen3,
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
            latent_kv: hf.latent_kv,
            kv_dtype: KvDtype::default(),
        };
        config.check_latent().map_err(|e| ModelError::checkpoint(path, e))?;
        Ok(config)
    }

    /// Latent ranks, if any, fit the model: one per layer, each 1..=kv_size.
    pub fn check_latent(&self) -> std::result::Result<(), String> {
        let Some(l) = &self.latent_kv else { return Ok(()) };
        for (what, ranks) in [("k_ranks", &l.k_ranks), ("v_ranks", &l.v_ranks)] {
            if ranks.len() != self.num_layers {
                return Err(format!("latent_kv.{what} has {} ranks for {} layers", ranks.len(), self.num_layers));
            }
            if let Some(r) = ranks.iter().find(|&&r| r == 0 || r > self.kv_size()) {
                return Err(format!("latent_kv.{what}: rank {r} is outside 1..={}", self.kv_size()));
            }
        }
        Ok(())
    }

    /// The Hugging Face `config.json` of this configuration (what `from_hf_json` reads back).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (arch, model_type) = match self.architecture {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "torch_dtype": "float32",
            "latent_kv": self.latent_kv,
        })
    }

    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Output widths of layer `l`'s key and value projections: kv_size each, or the latent ranks.
    pub fn kv_widths(&self, l: usize) -> (usize, usize) {
        match &self.latent_kv {
            Some(lat) => (lat.k_ranks[l], lat.v_ranks[l]),
            None => (self.kv_size(), self.kv_size()),
        }
    }

    /// The rows one token adds to layer `l`'s key and value caches, as (heads, width) each:
    /// (kv_heads, head_dim), or one latent row of the layer's rank.
    pub fn cache_rows(&self, l: usize) -> [(usize, usize); 2] {
        match &self.latent_kv {
            Some(lat) => [(1, lat.k_ranks[l]), (1, lat.v_ranks[l])],
            None => [(self.num_kv_heads, self.head_dim); 2],
        }
    }

    /// Bytes of KV cache one token takes over all layers: the one rule every budget, metric and
    /// report uses.
    pub fn kv_bytes_per_token(&self) -> usize {
        (0..self.num_layers)
            .map(|l| self.cache_rows(l).iter().map(|(h, w)| h * w).sum::<usize>() * self.kv_dtype.bytes())
            .sum()
    }
}
