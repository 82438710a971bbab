//! The training API's request bodies, typed: the Tinker SDK's JSON forms and xorl-client's
//! (where the two name a field differently, serde aliases say so). A field of the wrong type is an
//! error naming its path; fields a client may add later are ignored.
use serde::Deserialize;
use std::collections::BTreeMap;
use tandem_train::{AdamParams, ConfigValue};

/// Routes that name a session.
#[derive(Deserialize)]
pub struct SessionRef {
    pub session_id: String,
}

/// Routes that name a training model.
#[derive(Deserialize)]
pub struct ModelRef {
    pub model_id: String,
}

/// Routes that name a future.
#[derive(Deserialize)]
pub struct FutureRef {
    pub request_id: String,
}

/// A queued request on a training model: its model and its place in that model's order.
#[derive(Deserialize)]
pub struct Queued {
    pub model_id: String,
    pub seq_id: i64,
}

/// `create_model`: Tinker names models by session and sequence, xorl-client by a name of its own.
#[derive(Deserialize)]
pub struct CreateModel {
    pub session_id: Option<String>,
    pub model_seq_id: Option<i64>,
    pub base_model: Option<String>,
    pub model_id: Option<String>,
    pub lora_config: Option<LoraConfig>,
    pub optimizer_config: Option<OptimizerConfig>,
}

#[derive(Deserialize)]
pub struct LoraConfig {
    pub rank: u64,
    pub alpha: Option<f64>,
    pub train_attn: Option<bool>,
    pub train_mlp: Option<bool>,
    pub train_unembed: Option<bool>,
    pub dropout: Option<f64>,
    pub seed: Option<u64>,
}

#[derive(Deserialize)]
pub struct OptimizerConfig {
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

/// `forward_backward` / `forward` in JSON: the input under `forward_backward_input` (Tinker) or
/// `forward_input`, or inline (xorl-client).
#[derive(Deserialize)]
pub struct ForwardBackward {
    #[serde(alias = "forward_input")]
    pub forward_backward_input: Option<TrainInput>,
    #[serde(flatten)]
    pub inline: TrainInput,
    pub forward_only: Option<bool>,
}

#[derive(Deserialize, Default)]
pub struct TrainInput {
    pub loss_fn: Option<String>,
    #[serde(alias = "loss_fn_params")]
    pub loss_fn_config: Option<BTreeMap<String, ConfigIn>>,
    pub data: Option<Vec<DatumIn>>,
}

/// A loss option: a number or a name.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum ConfigIn {
    Number(f64),
    Text(String),
}

impl From<ConfigIn> for ConfigValue {
    fn from(c: ConfigIn) -> Self {
        match c {
            ConfigIn::Number(x) => ConfigValue::Number(x),
            ConfigIn::Text(t) => ConfigValue::Text(t),
        }
    }
}

#[derive(Deserialize)]
pub struct DatumIn {
    pub model_input: ModelInput,
    #[serde(default)]
    pub loss_fn_inputs: BTreeMap<String, TensorIn>,
}

/// A model input: Tinker's chunks or xorl-client's `input_ids`.
#[derive(Deserialize)]
pub struct ModelInput {
    pub input_ids: Option<Vec<u32>>,
    pub chunks: Option<Vec<Chunk>>,
}

#[derive(Deserialize)]
pub struct Chunk {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub tokens: Option<Vec<u32>>,
}

impl ModelInput {
    /// The token ids, chunk after chunk.
    pub fn tokens(self) -> Result<Vec<u32>, String> {
        if let Some(ids) = self.input_ids {
            return Ok(ids);
        }
        let chunks = self.chunks.ok_or("model_input needs `chunks` or `input_ids`")?;
        let mut out = Vec::new();
        for c in chunks {
            match c.kind.as_deref().unwrap_or("encoded_text") {
                "encoded_text" => out.extend(c.tokens.ok_or("an encoded_text chunk needs `tokens`")?),
                other => return Err(format!("`{other}` chunks are not supported: tandem serves text models")),
            }
        }
        Ok(out)
    }
}

/// A tensor: `{"data": [...], "dtype", "shape"}` or a bare (nested) array of numbers.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum TensorIn {
    Wrapped { data: Numbers },
    Bare(Numbers),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Numbers {
    One(f64),
    Many(Vec<Numbers>),
}

impl TensorIn {
    /// The values, flattened in row-major order.
    pub fn values(self) -> Vec<f64> {
        fn flat(n: Numbers, out: &mut Vec<f64>) {
            match n {
                Numbers::One(x) => out.push(x),
                Numbers::Many(items) => items.into_iter().for_each(|x| flat(x, out)),
            }
        }
        let mut out = Vec::new();
        match self {
            TensorIn::Wrapped { data } | TensorIn::Bare(data) => flat(data, &mut out),
        }
        out
    }
}

/// `optim_step`: Tinker's `adam_params` or xorl-client's `optim_params`; unset fields take
/// [`AdamParams::default`].
#[derive(Deserialize)]
pub struct OptimStep {
    #[serde(alias = "optim_params")]
    pub adam_params: Option<AdamIn>,
}

#[derive(Deserialize, Default)]
pub struct AdamIn {
    #[serde(alias = "lr")]
    pub learning_rate: Option<f64>,
    pub beta1: Option<f64>,
    pub beta2: Option<f64>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
    pub grad_clip_norm: Option<f64>,
}

impl From<AdamIn> for AdamParams {
    fn from(a: AdamIn) -> Self {
        let d = AdamParams::default();
        AdamParams {
            learning_rate: a.learning_rate.unwrap_or(d.learning_rate),
            beta1: a.beta1.unwrap_or(d.beta1),
            beta2: a.beta2.unwrap_or(d.beta2),
            eps: a.eps.unwrap_or(d.eps),
            weight_decay: a.weight_decay.unwrap_or(d.weight_decay),
            grad_clip_norm: a.grad_clip_norm.unwrap_or(d.grad_clip_norm),
        }
    }
}

/// `save_weights` / `save_weights_for_sampler`: the checkpoint's name (`path` in Tinker).
#[derive(Deserialize)]
pub struct SaveWeights {
    #[serde(alias = "name")]
    pub path: Option<String>,
}

/// `load_weights` into a model (`model_id`, `seq_id`) or as a new one (`session_id`, `model_seq_id`).
#[derive(Deserialize)]
pub struct LoadWeights {
    pub path: String,
    #[serde(alias = "load_optimizer", default)]
    pub optimizer: bool,
    pub model_id: Option<String>,
    pub seq_id: Option<i64>,
    pub session_id: Option<String>,
    pub model_seq_id: Option<i64>,
}

/// `create_sampling_session` (Tinker: in a session) or xorl-client's name for saved weights.
#[derive(Deserialize)]
pub struct CreateSampler {
    pub session_id: Option<String>,
    pub model_path: Option<String>,
    pub base_model: Option<String>,
}

/// `asample`: from a sampling session's weights, or from the base model.
#[derive(Deserialize)]
pub struct Sample {
    pub sampling_session_id: Option<String>,
    pub seq_id: Option<i64>,
    pub base_model: Option<String>,
    pub prompt: ModelInput,
    pub num_samples: Option<u64>,
    #[serde(default)]
    pub sampling_params: Option<SamplingIn>,
    #[serde(default)]
    pub prompt_logprobs: Option<bool>,
    pub topk_prompt_logprobs: Option<u64>,
    pub topk_sample_logprobs: Option<u64>,
    pub prompt_alt_tokens_k: Option<u64>,
    pub target_prompt_logprobs: Option<serde_json::Value>,
}

/// The Tinker SDK's `SamplingParams`.
#[derive(Deserialize, Default)]
pub struct SamplingIn {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<StopIn>,
}

/// `stop`: one string, or a list of strings and token ids.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum StopIn {
    One(String),
    Many(Vec<StopItem>),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum StopItem {
    Text(String),
    Token(u32),
}

/// `/generate` (SGLang's form, what xorl-client samples with).
#[derive(Deserialize)]
pub struct Generate {
    pub input_ids: Option<Vec<u32>>,
    pub text: Option<String>,
    pub lora_path: Option<String>,
    #[serde(default)]
    pub sampling_params: GenerateParams,
}

#[derive(Deserialize, Default)]
pub struct GenerateParams {
    pub max_new_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub n: Option<u64>,
    pub stop: Option<StopIn>,
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(alias = "sampling_seed")]
    pub seed: Option<u64>,
}

/// `weights_info`: Tinker's `tinker_path` (older clients: `path` or `model_path`).
#[derive(Deserialize)]
pub struct WeightsInfo {
    #[serde(alias = "path", alias = "model_path")]
    pub tinker_path: String,
}

/// `/tandem/v1/export`: a checkpoint into a folder `name` under the server's export directory.
#[derive(Deserialize)]
pub struct Export {
    pub path: String,
    pub name: String,
    #[serde(default)]
    pub overwrite: Option<bool>,
    /// Refused: a client never chooses where the server writes.
    pub out_dir: Option<serde_json::Value>,
}
