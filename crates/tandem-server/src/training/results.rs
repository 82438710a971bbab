//! Results of training-API futures, rendered as protobuf (what the Tinker SDK asks for on
//! forward_backward and sample) or JSON (everything else, and xorl-client).
use super::proto;
use prost::Message;
use serde_json::{json, Value};

pub struct ForwardBackwardResult {
    pub logprobs: Vec<Vec<f32>>,
    pub metrics: std::collections::BTreeMap<String, f64>,
}

pub struct SampledSequence {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// True when a stop token or string ended it; false at the length limit.
    pub stopped: bool,
}

pub struct SampleResult {
    pub sequences: Vec<SampledSequence>,
    pub prompt_logprobs: Option<Vec<f32>>,
}

pub enum Outcome {
    Json(Value),
    ForwardBackward(ForwardBackwardResult),
    Sample(SampleResult),
    Failed { error: String, category: &'static str },
}

impl Outcome {
    pub fn failed_user(msg: impl Into<String>) -> Outcome {
        Outcome::Failed { error: msg.into(), category: "user" }
    }
    pub fn failed_server(msg: impl Into<String>) -> Outcome {
        Outcome::Failed { error: msg.into(), category: "server" }
    }

    /// The protobuf body, for results that have one.
    pub fn proto(&self) -> Option<Vec<u8>> {
        match self {
            Outcome::ForwardBackward(r) => {
                let mut data = Vec::new();
                let mut offsets = vec![0i64];
                for lp in &r.logprobs {
                    data.extend(proto::f32_bytes(lp.iter().copied()));
                    offsets.push(data.len() as i64);
                }
                let field = proto::BatchedTensor {
                    data,
                    offsets: offsets.iter().flat_map(|o| o.to_le_bytes()).collect(),
                    dtype: proto::DType::Float32 as i32,
                    trailing_shape: vec![],
                };
                let record = proto::ArrayRecord {
                    type_tag: "LossFnOutput".into(),
                    fields: [("logprobs".to_string(), field)].into(),
                    num_datums: r.logprobs.len() as i64,
                };
                let out = proto::ForwardBackwardOutput {
                    loss_fn_output_type: "ArrayRecord".into(),
                    loss_fn_outputs: vec![record],
                    metrics: r.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                };
                Some(out.encode_to_vec())
            }
            Outcome::Sample(r) => {
                let out = proto::SampleResponse {
                    sequences: r
                        .sequences
                        .iter()
                        .map(|s| proto::SampledSequence {
                            stop_reason: if s.stopped { proto::StopReason::Stop } else { proto::StopReason::Length }
                                as i32,
                            tokens: proto::i32_bytes(s.tokens.iter().copied()),
                            logprobs: Some(proto::f32_bytes(s.logprobs.iter().copied())),
                            topk_sampled_logprobs: None,
                        })
                        .collect(),
                    prompt_logprobs: r.prompt_logprobs.as_ref().map(|p| proto::f32_bytes(p.iter().copied())),
                    topk_prompt_logprobs: None,
                    prompt_cache_hit_tokens: 0,
                };
                Some(out.encode_to_vec())
            }
            _ => None,
        }
    }

    /// The JSON body (the same content as the protobuf where there is one).
    pub fn json(&self) -> Value {
        let finite = |x: f32| if x.is_finite() { json!(x) } else { Value::Null };
        match self {
            Outcome::Json(v) => v.clone(),
            Outcome::Failed { error, category } => json!({"error": error, "category": category}),
            Outcome::ForwardBackward(r) => json!({
                "loss_fn_output_type": "ArrayRecord",
                "loss_fn_outputs": r.logprobs.iter().map(|lp| json!({
                    "logprobs": {"data": lp, "dtype": "float32", "shape": [lp.len()]}
                })).collect::<Vec<_>>(),
                "metrics": r.metrics,
                "type": "forward_backward",
            }),
            Outcome::Sample(r) => json!({
                "type": "sample",
                "sequences": r.sequences.iter().map(|s| json!({
                    "stop_reason": if s.stopped { "stop" } else { "length" },
                    "tokens": s.tokens,
                    "logprobs": s.logprobs,
                })).collect::<Vec<_>>(),
                "prompt_logprobs": r.prompt_logprobs.as_ref().map(|p| p.iter().map(|&x| finite(x)).collect::<Vec<_>>()),
            }),
        }
    }
}
