//! The protobuf messages of the Tinker wire protocol (package `tinker_public`, proto3) that tandem
//! reads and writes: forward_backward requests, and forward_backward and sample results. Field
//! numbers follow the descriptor the official SDK ships (tinker/proto/tinker_public_pb2.py);
//! fields tandem does not use are left out (protobuf skips unknown fields).
use std::collections::HashMap;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ForwardBackwardRequest {
    #[prost(string, tag = "1")]
    pub model_id: String,
    #[prost(int32, tag = "2")]
    pub seq_id: i32,
    #[prost(message, repeated, tag = "3")]
    pub data: Vec<Datum>,
    #[prost(string, tag = "4")]
    pub loss_fn: String,
    #[prost(map = "string, double", tag = "5")]
    pub loss_fn_config: HashMap<String, f64>,
    #[prost(bool, tag = "6")]
    pub forward_only: bool,
    #[prost(map = "string, message", tag = "7")]
    pub loss_fn_config_v2: HashMap<String, LossConfigValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LossConfigValue {
    #[prost(oneof = "loss_config_value::Value", tags = "1, 2")]
    pub value: Option<loss_config_value::Value>,
}

pub mod loss_config_value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(double, tag = "1")]
        Number(f64),
        #[prost(string, tag = "2")]
        Text(String),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Datum {
    #[prost(message, repeated, tag = "1")]
    pub model_input: Vec<Chunk>,
    #[prost(map = "string, message", tag = "2")]
    pub loss_fn_inputs: HashMap<String, Tensor>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Chunk {
    #[prost(oneof = "chunk::Chunk", tags = "1, 2, 3")]
    pub chunk: Option<chunk::Chunk>,
}

pub mod chunk {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Chunk {
        #[prost(message, tag = "1")]
        EncodedText(super::EncodedTextChunk),
        /// Images and audio: tandem's models are text-only (refused with a clear error).
        #[prost(bytes, tag = "2")]
        Image(Vec<u8>),
        #[prost(bytes, tag = "3")]
        Dmel(Vec<u8>),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EncodedTextChunk {
    /// int32 little-endian token ids.
    #[prost(bytes = "vec", tag = "1")]
    pub tokens: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SparseCsr {
    #[prost(bytes = "vec", tag = "1")]
    pub values: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub crow_indices: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub col_indices: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Tensor {
    #[prost(oneof = "tensor::Encoding", tags = "1, 2")]
    pub encoding: Option<tensor::Encoding>,
    #[prost(enumeration = "DType", tag = "3")]
    pub dtype: i32,
    #[prost(int64, repeated, tag = "4")]
    pub shape: Vec<i64>,
}

pub mod tensor {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Encoding {
        #[prost(bytes, tag = "1")]
        Dense(Vec<u8>),
        #[prost(message, tag = "2")]
        SparseCsr(super::SparseCsr),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DType {
    Unspecified = 0,
    Float32 = 1,
    Int64 = 2,
    Int32 = 3,
    Bfloat16 = 4,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchedTensor {
    /// Every datum's array, concatenated.
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
    /// int64 byte offsets into `data`, one per datum plus a final one.
    #[prost(bytes = "vec", tag = "2")]
    pub offsets: Vec<u8>,
    #[prost(enumeration = "DType", tag = "3")]
    pub dtype: i32,
    #[prost(int64, repeated, tag = "4")]
    pub trailing_shape: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ArrayRecord {
    #[prost(string, tag = "1")]
    pub type_tag: String,
    #[prost(map = "string, message", tag = "2")]
    pub fields: HashMap<String, BatchedTensor>,
    #[prost(int64, tag = "3")]
    pub num_datums: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ForwardBackwardOutput {
    #[prost(string, tag = "1")]
    pub loss_fn_output_type: String,
    #[prost(message, repeated, tag = "2")]
    pub loss_fn_outputs: Vec<ArrayRecord>,
    #[prost(map = "string, double", tag = "3")]
    pub metrics: HashMap<String, f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum StopReason {
    Stop = 0,
    Length = 1,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TopkLogprobs {
    #[prost(bytes = "vec", tag = "1")]
    pub token_ids: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub logprobs: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub k: u32,
    #[prost(uint32, tag = "4")]
    pub length: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SampledSequence {
    #[prost(enumeration = "StopReason", tag = "1")]
    pub stop_reason: i32,
    /// int32 little-endian.
    #[prost(bytes = "vec", tag = "2")]
    pub tokens: Vec<u8>,
    /// float32 little-endian, one per token.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub logprobs: Option<Vec<u8>>,
    #[prost(message, optional, tag = "4")]
    pub topk_sampled_logprobs: Option<TopkLogprobs>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SampleResponse {
    #[prost(message, repeated, tag = "1")]
    pub sequences: Vec<SampledSequence>,
    /// float32 little-endian, one per prompt token (NaN at position 0).
    #[prost(bytes = "vec", optional, tag = "2")]
    pub prompt_logprobs: Option<Vec<u8>>,
    #[prost(message, optional, tag = "3")]
    pub topk_prompt_logprobs: Option<TopkLogprobs>,
    #[prost(int32, tag = "4")]
    pub prompt_cache_hit_tokens: i32,
}

pub fn i32_bytes(v: impl IntoIterator<Item = u32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| (x as i32).to_le_bytes()).collect()
}

pub fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A tensor's values as f64 (dense or sparse CSR), and its shape.
pub fn tensor_values(t: &Tensor) -> Result<(Vec<f64>, Vec<usize>), String> {
    let dtype = DType::try_from(t.dtype).map_err(|_| format!("unknown dtype {}", t.dtype))?;
    let decode = |bytes: &[u8]| -> Result<Vec<f64>, String> {
        let (size, f): (usize, fn(&[u8]) -> f64) = match dtype {
            DType::Float32 => (4, |b| f32::from_le_bytes(b.try_into().unwrap()) as f64),
            DType::Int64 => (8, |b| i64::from_le_bytes(b.try_into().unwrap()) as f64),
            DType::Int32 => (4, |b| i32::from_le_bytes(b.try_into().unwrap()) as f64),
            DType::Bfloat16 => (2, |b| f32::from_bits((u16::from_le_bytes(b.try_into().unwrap()) as u32) << 16) as f64),
            DType::Unspecified => return Err("tensor dtype is unspecified".into()),
        };
        if !bytes.len().is_multiple_of(size) {
            return Err(format!("{} bytes do not split into {dtype:?} values", bytes.len()));
        }
        Ok(bytes.chunks_exact(size).map(f).collect())
    };
    let shape: Vec<usize> = t.shape.iter().map(|&d| d.max(0) as usize).collect();
    let values = match &t.encoding {
        None => Vec::new(),
        Some(tensor::Encoding::Dense(b)) => decode(b)?,
        Some(tensor::Encoding::SparseCsr(csr)) => {
            let [rows, cols] = shape[..] else { return Err("a sparse tensor must be 2-D".into()) };
            let ints = |b: &[u8]| -> Vec<usize> {
                b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()).max(0) as usize).collect()
            };
            let (vals, crow, col) = (decode(&csr.values)?, ints(&csr.crow_indices), ints(&csr.col_indices));
            if crow.len() != rows + 1 || col.len() != vals.len() {
                return Err("sparse tensor indices do not match its shape".into());
            }
            let mut dense = vec![0.0; rows * cols];
            for r in 0..rows {
                for i in crow[r]..crow[r + 1].min(vals.len()) {
                    if col[i] >= cols {
                        return Err("sparse column index out of range".into());
                    }
                    dense[r * cols + col[i]] = vals[i];
                }
            }
            dense
        }
    };
    let expected: usize = shape.iter().product();
    if !shape.is_empty() && expected != values.len() {
        return Err(format!("shape {shape:?} holds {expected} values, the data has {}", values.len()));
    }
    Ok((values, shape))
}
