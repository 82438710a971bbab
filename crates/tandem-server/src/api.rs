//! The OpenAI request bodies tandem accepts. Unknown fields are ignored (as OpenAI and vLLM do);
//! every known field is checked, and a wrong one is named in the 400 error.
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields both endpoints share.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Common {
    /// Who the request is attributed to (set from headers / `user`, never from the body itself).
    #[serde(skip)]
    pub client: Option<String>,
    #[serde(skip)]
    pub agent: Option<String>,
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// vLLM's: no stop token, stop id or stop string ends the output before this many tokens.
    pub min_tokens: Option<i64>,
    /// vLLM's: the stop string that ends an output is kept in it.
    pub include_stop_str_in_output: Option<bool>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub seed: Option<u64>,
    pub user: Option<String>,
    pub ignore_eos: Option<bool>,
    /// Token id (as a string, OpenAI's form) -> bias added to its logit, -100..=100.
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// OpenAI's structured output (`text`, `json_object`, `json_schema`).
    pub response_format: Option<ResponseFormat>,
    /// vLLM's structured outputs: a JSON schema (an object, or a string holding one), a regular
    /// expression, one of several strings, a Lark grammar; or all of those in one object.
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub structured_outputs: Option<StructuredOutputs>,
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

/// `response_format.json_schema`: the schema under a name (`strict` is accepted; tandem always
/// holds the output to the schema).
#[derive(Debug, Clone, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    pub schema: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs` (its newer spelling of the `guided_*` fields).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct StructuredOutputs {
    pub json: Option<serde_json::Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
}

/// The completions-only fields; `Common` is read from the same body separately (not flattened, so
/// that an error names the field it is about).
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Number of most likely alternatives to return per token (0-20).
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant turn's calls of tools.
    pub tool_calls: Option<Vec<ApiToolCall>>,
    /// A tool message: the call it answers.
    pub tool_call_id: Option<String>,
}

/// A tool call as OpenAI sends it back in the history (its arguments a JSON string).
#[derive(Debug, Clone, Deserialize)]
pub struct ApiToolCall {
    pub id: Option<String>,
    pub function: ApiFunctionCall,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiFunctionCall {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// vLLM's: end the prompt with the assistant turn's opening (default true).
    pub add_generation_prompt: Option<bool>,
    /// vLLM's: the model continues the final message instead of answering it.
    pub continue_final_message: Option<bool>,
    /// OpenAI's tools (`{"type": "function", "function": {"name", "description", "parameters"}}`),
    /// checked in `tools.rs`.
    pub tools: Option<Vec<serde_json::Value>>,
    pub tool_choice: Option<serde_json::Value>,
    /// Accepted; several calls in one answer are always returned.
    pub parallel_tool_calls: Option<bool>,
}
