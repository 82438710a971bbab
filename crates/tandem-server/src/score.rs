//! `POST /tandem/v1/score`: how confident a model is in given continuations of a prompt, from one
//! prefill each and without generating (Squeeze Evolve's routing signal; also a prompt's
//! per-token logprobs). The continuations of one call are submitted together, so the engine
//! batches them and computes their shared prompt once (prefix cache).
use crate::api::{ChatMessage, Common};
use crate::auth::Identity;
use crate::error::ApiError;
use crate::prompt::{chat_messages, chat_prompt, tokenize};
use crate::routes::{identify, in_range, parse};
use crate::{AppState, Server};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tandem_engine::{Event, GenerationRequest, ScoreSpec, TokenScore, Usage};
use tandem_runtime::SamplingParams;

/// Most continuations one call may score.
const MAX_CONTINUATIONS: usize = 64;

/// The top-k Squeeze Evolve's confidence reads (its paper's k).
pub const DEFAULT_TOP_K: usize = 20;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Text {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreRequest {
    #[serde(default, rename = "model")]
    _model: Option<String>,
    /// The prompt as text or token ids; or `messages`, rendered by the model's chat template
    /// with the assistant's turn opened (a chat answer's confidence).
    prompt: Option<Text>,
    messages: Option<Vec<ChatMessage>>,
    continuations: Vec<Text>,
    /// Entries per position in the top-k statistics (1-100).
    top_k: Option<i64>,
    /// Also return each token's logprob and top-k mean.
    per_token: Option<bool>,
    #[serde(default, rename = "user")]
    _user: Option<String>,
}

/// One scored continuation.
pub(crate) struct ScoreOutcome {
    pub tokens: Vec<TokenScore>,
    pub usage: Usage,
}

impl ScoreOutcome {
    /// Squeeze Evolve's C: minus the mean over the continuation's tokens of the mean logprob of
    /// the top-k tokens at each position (higher: the model's distribution is more peaked there).
    pub fn confidence(&self) -> f64 {
        -self.tokens.iter().map(|t| t.top_mean() as f64).sum::<f64>() / self.tokens.len().max(1) as f64
    }
}

/// Scores each continuation after `prompt` on `state`'s engine, charged to `client`/`agent`.
/// All are submitted before any is awaited (one batch); dropping the future cancels them.
pub(crate) async fn score_ids(
    state: &AppState,
    prompt: &[u32],
    continuations: Vec<Vec<u32>>,
    top_k: usize,
    client: Option<String>,
    agent: Option<String>,
) -> Result<Vec<ScoreOutcome>, ApiError> {
    let mut receivers = Vec::with_capacity(continuations.len());
    for (i, c) in continuations.into_iter().enumerate() {
        if c.is_empty() {
            return Err(ApiError::bad_request(format!("continuation {i} is empty"), Some("continuations")));
        }
        let request = GenerationRequest {
            prompt: prompt.iter().copied().chain(c).collect(),
            max_tokens: 1,
            sampling: SamplingParams::default(),
            stop_token_ids: Vec::new(),
            client: client.clone(),
            agent: agent.clone(),
            weights: None,
            score: Some(ScoreSpec { from: prompt.len(), top_k }),
        };
        receivers.push(state.engine.submit(request)?);
    }
    let mut out = Vec::with_capacity(receivers.len());
    for mut rx in receivers {
        let mut tokens = Vec::new();
        let usage = loop {
            match rx.recv().await {
                Some(Event::Scored(s)) => tokens.extend(s),
                Some(Event::Finished { usage, .. }) => break usage,
                Some(Event::Failed(m)) => return Err(ApiError::internal(format!("scoring failed: {m}"))),
                Some(Event::Token(_)) => {}
                None => return Err(ApiError::unavailable("the engine stopped", 1)),
            }
        };
        state.metrics.prompt_tokens.fetch_add((usage.prompt_tokens - usage.cached_tokens) as u64, Ordering::Relaxed);
        out.push(ScoreOutcome { tokens, usage });
    }
    Ok(out)
}

pub async fn score(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    identity: Option<Extension<Identity>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match handle(&server, &headers, identity.as_deref(), body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn handle(
    server: &Server,
    headers: &HeaderMap,
    identity: Option<&Identity>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    let (req, mut common): (ScoreRequest, Common) = parse(body)?;
    identify(headers, identity, &mut common);
    let state = server.model(common.model.as_deref())?;
    let prompt = match (&req.prompt, &req.messages) {
        (Some(Text::Text(t)), None) => tokenize(&state, t)?,
        (Some(Text::Tokens(ids)), None) => ids.clone(),
        (None, Some(m)) => chat_prompt(&state, &chat_messages(m)?)?,
        _ => return Err(ApiError::bad_request("give exactly one of `prompt` and `messages`", Some("prompt"))),
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_request(
            "the prompt is empty (the first continuation token needs one before it)",
            Some("prompt"),
        ));
    }
    if req.continuations.is_empty() || req.continuations.len() > MAX_CONTINUATIONS {
        return Err(ApiError::bad_request(
            format!("`continuations` must hold 1 to {MAX_CONTINUATIONS} entries, got {}", req.continuations.len()),
            Some("continuations"),
        ));
    }
    let top_k = in_range(req.top_k.unwrap_or(DEFAULT_TOP_K as i64), 1, tandem_engine::MAX_SCORE_TOP_K as i64, "top_k")?;
    let continuations = req
        .continuations
        .iter()
        .map(|c| match c {
            Text::Text(t) => tokenize(&state, t),
            Text::Tokens(ids) => Ok(ids.clone()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let scored = score_ids(&state, &prompt, continuations, top_k as usize, common.client, common.agent).await?;
    let per_token = req.per_token.unwrap_or(false);
    let (mut prompt_tokens, mut cached) = (0, 0);
    let data: Vec<Value> = scored
        .iter()
        .enumerate()
        .map(|(index, s)| {
            prompt_tokens += s.usage.prompt_tokens;
            cached += s.usage.cached_tokens;
            let logprob: f64 = s.tokens.iter().map(|t| t.logprob as f64).sum();
            let mut item = json!({
                "index": index, "tokens": s.tokens.len(), "confidence": s.confidence(),
                "logprob": logprob, "mean_logprob": logprob / s.tokens.len().max(1) as f64,
            });
            if per_token {
                let name = |id: u32| state.tokenizer.decode(&[id], false).unwrap_or_default();
                item["per_token"] = s
                    .tokens
                    .iter()
                    .map(|t| json!({"token": name(t.token), "id": t.token, "logprob": t.logprob, "top_mean": t.top_mean()}))
                    .collect();
            }
            item
        })
        .collect();
    Ok(json!({
        "object": "score", "model": state.model_name, "top_k": top_k, "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }))
}
