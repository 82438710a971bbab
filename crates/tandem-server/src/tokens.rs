//! `/tokenize` and `/detokenize` (vLLM's routes): the token ids the completion and chat routes
//! would feed the model for a prompt or a chat, counted before sending it (an agent fitting its
//! context, an RL loop budgeting its rollouts), and ids back to text.
use crate::api::ChatMessage;
use crate::error::ApiError;
use crate::prompt::{chat_messages, chat_prompt_as, tokenize};
use crate::routes::parse;
use crate::Shared;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    /// A completion's prompt, tokenized as /v1/completions does.
    pub prompt: Option<String>,
    /// Or a chat, rendered by the model's template as /v1/chat/completions does.
    pub messages: Option<Vec<ChatMessage>>,
    /// With `messages`: end with the assistant turn's opening, as a chat request does (default),
    /// or continue the final message; as in a chat request.
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    /// The chat's tools, rendered into the prompt as the chat route renders them.
    pub tools: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

pub async fn tokenize_route(State(server): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    let result = (|| {
        let (req, common): (TokenizeRequest, _) = parse(body)?;
        let state = server.model(common.model.as_deref())?;
        let ids = match (&req.prompt, &req.messages) {
            (Some(p), None) => tokenize(&state, p)?,
            (None, Some(m)) => chat_prompt_as(
                &state,
                &chat_messages(m)?,
                req.add_generation_prompt,
                req.continue_final_message,
                req.tools.clone().map(serde_json::Value::Array).as_ref(),
            )?,
            _ => return Err(ApiError::bad_request("send either `prompt` or `messages`", None)),
        };
        Ok(json!({"count": ids.len(), "max_model_len": state.engine.config().max_seq_len, "tokens": ids}))
    })();
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn detokenize_route(State(server): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    let result = (|| {
        let (req, common): (DetokenizeRequest, _) = parse(body)?;
        let state = server.model(common.model.as_deref())?;
        if let Some(bad) = req.tokens.iter().find(|&&t| state.tokenizer.id_to_token(t).is_none()) {
            return Err(ApiError::bad_request(
                format!("token id {bad} is outside the vocabulary ({})", state.tokenizer.get_vocab_size(true)),
                Some("tokens"),
            ));
        }
        let text = state
            .tokenizer
            .decode(&req.tokens, false)
            .map_err(|e| ApiError::bad_request(format!("cannot decode the tokens: {e}"), Some("tokens")))?;
        Ok(json!({"prompt": text}))
    })();
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
