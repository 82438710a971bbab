//! Where a model's tensors come from: an HF folder of safetensors shards or a GGUF file.
//! Both answer to the HF tensor names (`model.layers.3.self_attn.q_proj.weight`); the GGUF source
//! translates them to llama.cpp's names (`blk.3.attn_q.weight`).
use crate::error::{ModelError, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

pub enum Weight {
    Dense(Tensor),
    Quantized(QTensor),
}

pub trait WeightSource {
    /// The file or folder, for error messages.
    fn path(&self) -> &Path;
    /// The tensor of that HF name, or None when the checkpoint lacks it.
    /// `keep_quantized` asks for GGUF block-quantized data as is instead of f32.
    fn get(&mut self, name: &str, keep_quantized: bool) -> Result<Option<Weight>>;
}

/// Sharded or single-file safetensors in an HF folder.
pub struct SafetensorsSource {
    folder: PathBuf,
    tensors: MmapedSafetensors,
    device: Device,
}

impl SafetensorsSource {
    pub fn open(folder: &Path, device: &Device) -> Result<Self> {
        let index = folder.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::checkpoint(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::checkpoint(&index, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::checkpoint(&index, "no `weight_map` object"))?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| folder.join(n)).collect()
        } else {
            let single = folder.join("model.safetensors");
            if !single.exists() {
                return Err(ModelError::checkpoint(
                    folder,
                    "no model.safetensors or model.safetensors.index.json in this folder",
                ));
            }
            vec![single]
        };
        for f in &files {
            if !f.exists() {
                return Err(ModelError::checkpoint(f, "shard named in model.safetensors.index.json is missing"));
            }
        }
        // SAFETY: the files are mapped read-only; tandem never writes checkpoints it has open.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| match e {
            // candle tags a shard it cannot read with its path: name that shard, not the folder.
            candle_core::Error::WithPath { inner, path } => ModelError::checkpoint(path, inner),
            e => ModelError::checkpoint(folder, e),
        })?;
        Ok(SafetensorsSource { folder: folder.into(), tensors, device: device.clone() })
    }
}

impl WeightSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.folder
    }

    fn get(&mut self, name: &str, _keep_quantized: bool) -> Result<Option<Weight>> {
        if self.tensors.get(name).is_err() {
            return Ok(None);
        }
        let t = self
            .tensors
            .load(name, &self.device)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| ModelError::checkpoint(&self.folder, format!("tensor `{name}`: {e}")))?;
        Ok(Some(Weight::Dense(t)))
    }
}

/// A GGUF file: metadata plus tensors, read on demand.
pub struct GgufSource {
    path: PathBuf,
    pub content: gguf_file::Content,
    reader: BufReader<File>,
    device: Device,
}

impl GgufSource {
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::checkpoint(path, e))?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| ModelError::checkpoint(path, format!("not a readable GGUF file: {e}")))?;
        Ok(GgufSource { path: path.into(), content, reader, device: device.clone() })
    }

    fn gguf_name(name: &str) -> Option<String> {
        let fixed = match name {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(f) = fixed {
            return Some(f.to_string());
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let (module, kind) = rest.rsplit_once('.')?;
        let module = match module {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "post_attention_layernorm" => "ffn_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            _ => return None,
        };
        Some(format!("blk.{layer}.{module}.{kind}"))
    }
}

impl WeightSource for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn get(&mut self, name: &str, keep_quantized: bool) -> Result<Option<Weight>> {
        let Some(gname) = Self::gguf_name(name) else { return Ok(None) };
        if !self.content.tensor_infos.contains_key(&gname) {
            return Ok(None);
        }
        let q = self
            .content
            .tensor(&mut self.reader, &gname, &self.device)
            .map_err(|e| ModelError::checkpoint(&self.path, format!("tensor `{gname}`: {e}")))?;
        let is_float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if keep_quantized && !is_float {
            return Ok(Some(Weight::Quantized(q)));
        }
        let t = q
            .dequantize(&self.device)
            .map_err(|e| ModelError::checkpoint(&self.path, format!("tensor `{gname}`: {e}")))?;
        Ok(Some(Weight::Dense(t)))
    }
}
