//! Opens a checkpoint (GGUF file or HF folder) and returns the model with its tokenizer and chat
//! template.
use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::model::{LoadOptions, Model};
use crate::tokenizer::{metadata_u32, tokenizer_from_gguf};
use crate::weights::{GgufSource, SafetensorsSource};
use candle_core::quantized::gguf_file::Content;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The checkpoint's own Jinja chat template, if it has one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Tokens that end generation.
    pub stop_token_ids: Vec<u32>,
    pub path: PathBuf,
    /// A short name for the model (file or folder name).
    pub name: String,
}

/// Tokens that end a turn in the chat formats tandem knows.
const END_TOKENS: &[&str] = &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>"];

pub fn load(path: &Path, opts: &LoadOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(ModelError::checkpoint(path, "no such file or folder"));
    }
    if path.is_dir() {
        load_hf(path, opts, progress)
    } else {
        load_gguf(path, opts, progress)
    }
}

fn name_of(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string()).unwrap_or_default()
}

fn stop_ids(tokenizer: &Tokenizer, mut ids: Vec<u32>) -> Vec<u32> {
    for t in END_TOKENS {
        if let Some(id) = tokenizer.token_to_id(t) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn gguf_config(path: &Path, ct: &Content) -> Result<ModelConfig> {
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| ModelError::checkpoint(path, "missing metadata `general.architecture`"))?;
    let architecture = match arch.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        _ => return Err(ModelError::UnknownArchitecture { path: path.into(), arch }),
    };
    let get = |key: &str| -> Result<usize> {
        metadata_u32(ct, &format!("{arch}.{key}"))
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::checkpoint(path, format!("missing metadata `{arch}.{key}`")))
    };
    let getf = |key: &str, default: f64| -> f64 {
        ct.metadata.get(&format!("{arch}.{key}")).and_then(|v| v.to_f32().ok()).map(|v| v as f64).unwrap_or(default)
    };
    let hidden_size = get("embedding_length")?;
    let num_heads = get("attention.head_count")?;
    if num_heads == 0 {
        return Err(ModelError::checkpoint(path, "attention.head_count is 0"));
    }
    let num_kv_heads = get("attention.head_count_kv").unwrap_or(num_heads);
    let head_dim = get("attention.key_length").unwrap_or(hidden_size / num_heads);
    let vocab_size = match get("vocab_size") {
        Ok(v) => v,
        Err(_) => ct
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| ModelError::MissingTensor { path: path.into(), name: "token_embd.weight".into() })?,
    };
    Ok(ModelConfig {
        architecture,
        hidden_size,
        intermediate_size: get("feed_forward_length")?,
        num_layers: get("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: getf("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta: getf("rope.freq_base", 10_000.0),
        rope_interleaved: architecture == Architecture::Llama,
        max_position_embeddings: get("context_length").unwrap_or(4096),
        tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        attention_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
        qk_norm: architecture == Architecture::Qwen3,
        bos_token_id: metadata_u32(ct, "tokenizer.ggml.bos_token_id"),
        eos_token_ids: metadata_u32(ct, "tokenizer.ggml.eos_token_id").into_iter().collect(),
        latent_kv: None,
        kv_dtype: crate::config::KvDtype::default(),
    })
}

fn load_gguf(path: &Path, opts: &LoadOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<LoadedModel> {
    let mut source = GgufSource::open(path, &opts.device)?;
    let config = gguf_config(path, &source.content)?;
    let tokenizer =
        tokenizer_from_gguf(&source.content).map_err(|message| ModelError::Tokenizer { path: path.into(), message })?;
    let token = |key: &str| metadata_u32(&source.content, key).and_then(|id| tokenizer.id_to_token(id));
    let bos_token = token("tokenizer.ggml.bos_token_id");
    let eos_token = token("tokenizer.ggml.eos_token_id");
    let chat_template =
        source.content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    let stop_token_ids = stop_ids(&tokenizer, config.eos_token_ids.clone());
    let model = Model::load(config, &mut source, opts, progress)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        bos_token,
        eos_token,
        stop_token_ids,
        path: path.into(),
        name: name_of(path),
    })
}

/// A token given in tokenizer_config.json either as a string or as {"content": ...}.
fn token_field(json: &serde_json::Value, key: &str) -> Option<String> {
    match json.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        v => v.get("content").and_then(|c| c.as_str()).map(String::from),
    }
}

fn load_hf(folder: &Path, opts: &LoadOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<LoadedModel> {
    let config_path = folder.join("config.json");
    if !config_path.exists() {
        return Err(ModelError::checkpoint(
            folder,
            "no config.json in this folder (expected an HF model folder or a .gguf file)",
        ));
    }
    let config = ModelConfig::from_hf_json(&config_path)?;
    let tok_path = folder.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(ModelError::checkpoint(&tok_path, "missing (the tokenizer is required)"));
    }
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| ModelError::Tokenizer { path: tok_path.clone(), message: e.to_string() })?;
    let tc_path = folder.join("tokenizer_config.json");
    let (mut chat_template, mut bos_token, mut eos_token) = (None, None, None);
    if tc_path.exists() {
        let text = std::fs::read_to_string(&tc_path).map_err(|e| ModelError::checkpoint(&tc_path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::checkpoint(&tc_path, format!("invalid JSON: {e}")))?;
        chat_template = match json.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            _ => None,
        };
        bos_token = token_field(&json, "bos_token");
        eos_token = token_field(&json, "eos_token");
    }
    let jinja = folder.join("chat_template.jinja");
    if chat_template.is_none() && jinja.exists() {
        chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::checkpoint(&jinja, e))?);
    }
    let mut eos_ids = config.eos_token_ids.clone();
    if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
        eos_ids.push(id);
    }
    let stop_token_ids = stop_ids(&tokenizer, eos_ids);
    let mut source = SafetensorsSource::open(folder, &opts.device)?;
    let model = Model::load(config, &mut source, opts, progress)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        bos_token,
        eos_token,
        stop_token_ids,
        path: folder.into(),
        name: name_of(folder),
    })
}

/// Writes a tokenizer where Hugging Face tooling loads it offline: `tokenizer.json` and a
/// `tokenizer_config.json` with the chat template and special tokens (GGUF files carry no folder).
pub fn save_tokenizer(
    dir: &Path,
    tokenizer: &Tokenizer,
    chat_template: Option<&str>,
    bos: Option<&str>,
    eos: Option<&str>,
) -> std::result::Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    tokenizer.save(dir.join("tokenizer.json"), false).map_err(|e| format!("saving the tokenizer: {e}"))?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template,
        "bos_token": bos,
        "eos_token": eos,
        "model_max_length": 1_000_000,
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_vec_pretty(&config).expect("json"))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Writes `model` as a Hugging Face folder `tandem serve --model` loads: `model.safetensors`
/// (f32, Hugging Face names and rope layout), `config.json` (the model's configuration with
/// `extra` merged in) and the tokenizer files.
pub fn save_hf(loaded: &LoadedModel, model: &Model, extra: serde_json::Value, out: &Path) -> Result<()> {
    let io = |e: std::io::Error| ModelError::checkpoint(out, e);
    std::fs::create_dir_all(out).map_err(io)?;
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = model.export_hf()?.into_iter().collect();
    let untied = tensors.contains_key("lm_head.weight");
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    let mut config = model.config.to_hf_json();
    config["tie_word_embeddings"] = serde_json::Value::Bool(!untied);
    if let (Some(c), serde_json::Value::Object(e)) = (config.as_object_mut(), extra) {
        c.extend(e);
    }
    std::fs::write(out.join("config.json"), serde_json::to_vec_pretty(&config).expect("json")).map_err(io)?;
    save_tokenizer(
        out,
        &loaded.tokenizer,
        loaded.chat_template.as_deref(),
        loaded.bos_token.as_deref(),
        loaded.eos_token.as_deref(),
    )
    .map_err(|e| ModelError::checkpoint(out, e))
}
