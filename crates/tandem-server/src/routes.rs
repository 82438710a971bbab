//! The HTTP routes: OpenAI completions and chat completions (plain and streamed), models, health
//! and metrics.
//!
//! Over 600 lines because both OpenAI endpoints share one job builder and one streaming path;
//! the request types are in `api.rs`, prompts as token ids in `prompt.rs`, choices in `choice.rs`,
//! errors in `error.rs`.
use crate::api::{ChatRequest, Common, CompletionRequest, Prompt, Stop};
use crate::auth::Identity;
use crate::choice::{self, ChoiceEvent, TokenInfo};
use crate::error::ApiError;
use crate::metrics::EngineGauges;
use crate::prompt::{chat_messages, chat_prompt_as, tokenize};
use crate::stop::Stops;
use crate::{AppState, Server, Shared, Target};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tandem_engine::{GenerationRequest, SpecUsage};
use tandem_runtime::SamplingParams;

/// A prompt's token ids and the text echoed before its completion.
type PromptIds = (Vec<u32>, Option<String>);

/// Most choices one request may ask for (n times the number of prompts).
const MAX_CHOICES: usize = 64;

/// Parses the body as the endpoint's own fields plus the common ones; errors name the field.
/// The client a request is charged to and the agent within it. With API keys on, the key is the
/// client and `X-Tandem-Client` only names an agent within it (unless the operator trusts the
/// header). Without keys: the `X-Tandem-Client` header, else the bearer token (as a short hash,
/// so tokens never appear in metrics), else the OpenAI `user` field; None shares "default".
/// `X-Tandem-Agent` names an agent within the client.
pub(crate) fn identify(headers: &HeaderMap, identity: Option<&Identity>, common: &mut Common) {
    let header = |name: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty()).map(String::from)
    };
    let (named, agent) = (header("x-tandem-client"), header("x-tandem-agent"));
    match identity.and_then(|i| i.key_client.clone()) {
        Some(key) if identity.is_some_and(|i| i.trust_client_header) => {
            common.client = Some(named.unwrap_or(key));
            common.agent = agent;
        }
        Some(key) => {
            common.client = Some(key);
            common.agent = agent.or(named);
        }
        None => {
            let token = crate::auth::request_key(headers).filter(|k| k != "unused" && k != "EMPTY");
            common.client = named.or_else(|| token.map(|k| crate::auth::key_name(&k))).or_else(|| common.user.clone());
            common.agent = agent;
        }
    }
}

/// OpenAI request fields, and vLLM's extensions, that tandem does not implement: a request that
/// asks for one of them gets a 400 naming it instead of an answer that silently ignores it (a
/// vLLM client's `bad_words` would otherwise be ignored). Their neutral values (absent, null,
/// false, 0, empty, `best_of: 1`, a `tool_choice` without tools) are accepted, since clients send
/// them by default.
fn refuse_unsupported(body: &Value) -> Result<(), ApiError> {
    let asks = |v: &Value| match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    };
    let field = |name: &str| body.get(name).filter(|v| asks(v));
    let refused = [
        "functions",
        "suffix",
        "use_beam_search",
        "truncate_prompt_tokens",
        "prompt_logprobs",
        "bad_words",
        "allowed_token_ids",
        "chat_template",
        "logits_processors",
    ]
    .into_iter()
    .find(|f| field(f).is_some())
    .or_else(|| field("best_of").filter(|v| v.as_f64() != Some(1.0)).map(|_| "best_of"));
    match refused {
        Some(name) => Err(ApiError::bad_request(
            format!("`{name}` is not supported by this server; remove it (or send its neutral value)"),
            Some(name),
        )),
        None => Ok(()),
    }
}

pub(crate) fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<(T, Common), ApiError> {
    let bytes = body.map_err(|r| ApiError::with_status(r.status(), r.body_text()))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object", None));
    }
    refuse_unsupported(&value)?;
    fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { None } else { Some(path.as_str()) };
            let at = field.map(|p| format!(" (field `{p}`)")).unwrap_or_default();
            ApiError::bad_request(format!("invalid request body: {}{at}", e.inner()), field)
        })
    }
    Ok((typed(&value)?, typed(&value)?))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

/// Everything needed to run one request, validated.
struct Job {
    endpoint: Endpoint,
    /// (choice index, request, text echoed before the completion)
    choices: Vec<(usize, GenerationRequest, Option<String>)>,
    prompt_tokens: usize,
    stops: Stops,
    logprobs: bool,
    stream: bool,
    include_usage: bool,
    /// Choices per prompt (`n`): choice index / n is its prompt.
    n: usize,
    /// Per prompt, its own tokens' logprobs (completions with `echo` and `logprobs`), reported
    /// before the completion's; empty otherwise.
    prompt_logprobs: Vec<Vec<TokenInfo>>,
    /// A chat that offered these tools: calls in each answer are returned as `tool_calls`.
    tool_calls: Option<Value>,
    /// `system_fingerprint`: the weight version the worker serves (the label its last weight
    /// update gave; what the SGLang gateway reports as a worker's `weight_version`).
    fingerprint: String,
}

pub(crate) fn in_range<T: PartialOrd + std::fmt::Display>(v: T, lo: T, hi: T, name: &str) -> Result<T, ApiError> {
    if v < lo || v > hi {
        return Err(ApiError::bad_request(format!("`{name}` must be between {lo} and {hi}, got {v}"), Some(name)));
    }
    Ok(v)
}

/// `logit_bias` as (token id, bias); the ids' and biases' ranges are the engine's to check.
fn logit_bias(c: &Common) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = |m: String| ApiError::bad_request(m, Some("logit_bias"));
    let mut out = Vec::new();
    for (key, &bias) in c.logit_bias.iter().flatten() {
        let id: u32 = key.trim().parse().map_err(|_| bad(format!("`logit_bias` keys are token ids, got `{key}`")))?;
        out.push((id, bias));
    }
    Ok(out)
}

/// The request's sampling parameters. Their ranges are checked once, by the engine
/// (`SamplingParams::validate`, the same rule the training API's sampling meets).
fn sampling(c: &Common, top_logprobs: usize) -> Result<SamplingParams, ApiError> {
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::bad_request(format!("`top_k` must be -1 (off) or positive, got {k}"), Some("top_k")))
        }
    };
    let min_tokens = match c.min_tokens {
        None => 0,
        Some(m) if m >= 0 => m as usize,
        Some(m) => {
            return Err(ApiError::bad_request(format!("`min_tokens` must be at least 0, got {m}"), Some("min_tokens")))
        }
    };
    Ok(SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k,
        top_p: c.top_p.unwrap_or(1.0),
        min_p: c.min_p.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        min_tokens,
        seed: c.seed,
        top_logprobs,
        logit_bias: logit_bias(c)?,
        grammar: None,
    })
}

/// Builds the choices of a job from its prompts, applying n, max_tokens, seeds and stops.
fn build_job(
    state: &AppState,
    endpoint: Endpoint,
    c: &Common,
    prompts: Vec<PromptIds>,
    max_tokens: Option<i64>,
    default_max_tokens: Option<usize>,
    logprobs: Option<usize>,
) -> Result<Job, ApiError> {
    let n = in_range(c.n.unwrap_or(1), 1, 16, "n")? as usize;
    if prompts.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
    }
    if prompts.len() * n > MAX_CHOICES {
        return Err(ApiError::bad_request(
            format!("at most {MAX_CHOICES} choices per request (prompts x n)"),
            Some("n"),
        ));
    }
    let limit = state.engine.config().max_seq_len;
    let mut base = sampling(c, logprobs.unwrap_or(0))?;
    base.grammar = crate::structured::grammar(state, c)?;
    let mut stop_ids = if c.ignore_eos.unwrap_or(false) { vec![] } else { state.stop_token_ids.clone() };
    stop_ids.extend(c.stop_token_ids.iter().flatten());
    let strings = match &c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if strings.len() > 16 {
        return Err(ApiError::bad_request("at most 16 stop strings", Some("stop")));
    }
    let stops = Stops { strings, included: c.include_stop_str_in_output.unwrap_or(false) };
    let mut choices = Vec::new();
    let mut prompt_tokens = 0;
    for (pi, (ids, echo)) in prompts.into_iter().enumerate() {
        let mut request = GenerationRequest {
            prompt: ids,
            max_tokens: 1,
            sampling: base.clone(),
            stop_token_ids: stop_ids.clone(),
            client: c.client.clone(),
            agent: c.agent.clone(),
            weights: None,
            score: None,
        };
        // The engine's one check of prompt and sampling, before any choice starts (the chat API
        // calls its prompt `messages`).
        state.engine.validate(&request).map_err(|e| {
            let mut e = ApiError::from(e);
            if endpoint == Endpoint::Chat && e.param.as_deref() == Some("prompt") {
                e.param = Some("messages".into());
            }
            e
        })?;
        let len = request.prompt.len();
        request.max_tokens = match max_tokens {
            Some(m) if m < 1 => {
                return Err(ApiError::bad_request(
                    format!("`max_tokens` must be at least 1, got {m}"),
                    Some("max_tokens"),
                ))
            }
            Some(m) if len as i64 + m > limit as i64 => return Err(ApiError::bad_request(
                format!(
                    "`max_tokens` is too large: this model's context is {limit} tokens, but {} were requested ({len} in the prompt, {m} to generate)",
                    len as i64 + m,
                ),
                Some("max_tokens"),
            )),
            Some(m) => m as usize,
            None => default_max_tokens.unwrap_or(limit - len).min(limit - len),
        };
        if request.sampling.min_tokens > request.max_tokens {
            return Err(ApiError::bad_request(
                format!(
                    "`min_tokens` ({}) must not exceed `max_tokens` ({})",
                    request.sampling.min_tokens, request.max_tokens
                ),
                Some("min_tokens"),
            ));
        }
        prompt_tokens += len;
        for j in 0..n {
            let mut choice = request.clone();
            choice.sampling.seed = base.seed.map(|s| s.wrapping_add(j as u64));
            choices.push((pi * n + j, choice, echo.clone()));
        }
    }
    Ok(Job {
        endpoint,
        choices,
        prompt_tokens,
        stops,
        logprobs: logprobs.is_some(),
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        n,
        prompt_logprobs: Vec::new(),
        tool_calls: None,
        fingerprint: String::new(),
    })
}

pub async fn completions(
    State(server): Shared,
    headers: HeaderMap,
    identity: Option<Extension<Identity>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let (req, mut common): (CompletionRequest, Common) = match parse(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    identify(&headers, identity.as_deref(), &mut common);
    let state = match server.model(common.model.as_deref()) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let echo = req.echo.unwrap_or(false);
    let texts: Result<Vec<PromptIds>, ApiError> = match &req.prompt {
        Prompt::Text(t) => tokenize(&state, t).map(|ids| vec![(ids, echo.then(|| t.clone()))]),
        Prompt::Texts(ts) => ts.iter().map(|t| tokenize(&state, t).map(|ids| (ids, echo.then(|| t.clone())))).collect(),
        Prompt::Tokens(ids) => {
            Ok(vec![(ids.clone(), echo.then(|| state.tokenizer.decode(ids, false).unwrap_or_default()))])
        }
        Prompt::TokenLists(ls) => Ok(ls
            .iter()
            .map(|ids| (ids.clone(), echo.then(|| state.tokenizer.decode(ids, false).unwrap_or_default())))
            .collect()),
    };
    let logprobs = match req.logprobs {
        None => None,
        Some(l) => match in_range(l, 0, 20, "logprobs") {
            Ok(l) => Some(l as usize),
            Err(e) => return e.into_response(),
        },
    };
    // `echo` with `logprobs` reports the prompt's tokens too (what lm-eval-harness and vLLM
    // users score with), and then `max_tokens: 0` asks for the prompt's logprobs alone.
    let prompt_only = echo && logprobs.is_some() && common.max_tokens == Some(0);
    let max_tokens = if prompt_only { Some(1) } else { common.max_tokens };
    let job = texts
        .and_then(|prompts| build_job(&state, Endpoint::Completions, &common, prompts, max_tokens, Some(16), logprobs));
    let mut job = match job {
        Ok(job) => job,
        Err(e) => return e.into_response(),
    };
    if let (true, Some(top)) = (echo, logprobs) {
        // Each prompt's first choice carries its ids.
        let prompts: Vec<Vec<u32>> = job.choices.iter().step_by(job.n).map(|c| c.1.prompt.clone()).collect();
        for ids in &prompts {
            match prompt_logprobs(&state, ids, top, &common).await {
                Ok(infos) => job.prompt_logprobs.push(infos),
                Err(e) => return e.into_response(),
            }
        }
        if prompt_only {
            job.choices.iter_mut().for_each(|c| c.1.max_tokens = 0);
        }
    }
    job.fingerprint = server.controls.weight_version();
    run(state, job, started).await
}

/// A prompt's own tokens with their logprobs and `top` alternatives, read from one prefill (a
/// scoring request); the first token has nothing before it (null, as vLLM reports it).
async fn prompt_logprobs(state: &AppState, ids: &[u32], top: usize, c: &Common) -> Result<Vec<TokenInfo>, ApiError> {
    let name = |id: u32| state.tokenizer.decode(&[id], false).unwrap_or_default();
    let mut infos = vec![TokenInfo { token: name(ids[0]), logprob: f32::NAN, top: Vec::new() }];
    if ids.len() > 1 {
        let scored =
            crate::score::score_ids(state, &ids[..1], vec![ids[1..].to_vec()], top, c.client.clone(), c.agent.clone())
                .await?;
        for t in scored.into_iter().flat_map(|s| s.tokens) {
            infos.push(TokenInfo {
                token: name(t.token),
                logprob: t.logprob,
                top: t.top.iter().map(|&(id, l)| (name(id), l)).collect(),
            });
        }
    }
    Ok(infos)
}

pub async fn chat_completions(
    State(server): Shared,
    headers: HeaderMap,
    identity: Option<Extension<Identity>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let (req, mut common): (ChatRequest, Common) = match parse(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    identify(&headers, identity.as_deref(), &mut common);
    let state = match server.target(common.model.as_deref()) {
        Ok(Target::Model(state)) => state,
        Ok(Target::Evolving(v)) => return crate::evolve::chat(v, req, common, started).await,
        Err(e) => return e.into_response(),
    };
    let result = (|| {
        let messages = chat_messages(&req.messages)?;
        let tool_use = crate::tools::requested(&req)?;
        let tools = tool_use.as_ref().map(|t| &t.tools);
        let ids = chat_prompt_as(&state, &messages, req.add_generation_prompt, req.continue_final_message, tools)?;
        let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
            (false, Some(_)) => {
                return Err(ApiError::bad_request("`top_logprobs` needs `logprobs: true`", Some("top_logprobs")))
            }
            (false, None) => None,
            (true, t) => Some(in_range(t.unwrap_or(0), 0, 20, "top_logprobs")? as usize),
        };
        let max_tokens = req.max_completion_tokens.or(common.max_tokens);
        let mut job = build_job(&state, Endpoint::Chat, &common, vec![(ids, None)], max_tokens, None, logprobs)?;
        if let Some(t) = &tool_use {
            if let Some(grammar) = t.held_to(&state, &common)? {
                job.choices.iter_mut().for_each(|(_, r, _)| r.sampling.grammar = Some(grammar.clone()));
            }
            job.tool_calls = t.parses().then(|| t.tools.clone());
        }
        Ok(job)
    })();
    match result {
        Ok(mut job) => {
            job.fingerprint = server.controls.weight_version();
            run(state, job, started).await
        }
        Err(e) => e.into_response(),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn completion_logprobs(tokens: &[TokenInfo], offset0: usize) -> Value {
    let mut offset = offset0;
    let mut offsets = Vec::new();
    for t in tokens {
        offsets.push(offset);
        offset += t.token.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|(s, l)| (s.clone(), json!(l))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn chat_logprobs(tokens: &[TokenInfo]) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    json!({"content": tokens.iter().map(|t| {
        let mut e = entry(&t.token, t.logprob);
        e["top_logprobs"] = Value::Array(t.top.iter().map(|(s, l)| entry(s, *l)).collect());
        e
    }).collect::<Vec<_>>()})
}

/// Completion tokens and speculation figures summed over a response's choices.
#[derive(Debug, Clone, Copy, Default)]
struct Counted {
    completion: usize,
    speculation: Option<SpecUsage>,
    /// Prompt tokens found in the KV cache, counted like prompt tokens: once per prompt (its
    /// first choice's; the others share that choice's blocks).
    cached: usize,
}

impl Counted {
    fn add(&mut self, completion: usize, speculation: Option<SpecUsage>, cached: usize) {
        self.completion += completion;
        self.cached += cached;
        if let Some(s) = speculation {
            let acc = self.speculation.get_or_insert_with(SpecUsage::default);
            acc.drafted_tokens += s.drafted_tokens;
            acc.accepted_tokens += s.accepted_tokens;
            acc.decode_steps += s.decode_steps;
        }
    }
}

/// OpenAI's usage object (with `prompt_tokens_details.cached_tokens`); with speculation, a
/// `speculation` extension (drafted and accepted draft tokens, target forwards, and tokens per
/// forward).
fn usage(prompt: usize, counted: Counted) -> Value {
    let completion = counted.completion;
    let mut u = json!({
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": counted.cached},
    });
    if let Some(s) = counted.speculation {
        u["speculation"] = json!({
            "drafted_tokens": s.drafted_tokens, "accepted_tokens": s.accepted_tokens,
            "decode_steps": s.decode_steps, "acceptance_length": s.acceptance_length(completion),
        });
    }
    u
}

async fn run(state: Arc<AppState>, job: Job, started: Instant) -> Response {
    state.metrics.prompt_tokens.fetch_add(job.prompt_tokens as u64, Ordering::Relaxed);
    let mut receivers = Vec::with_capacity(job.choices.len());
    for (index, request, echo) in &job.choices {
        if request.max_tokens == 0 {
            // The prompt's logprobs alone (`echo`, `max_tokens: 0`): nothing to generate.
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let end =
                ChoiceEvent::End { finish_reason: "length", completion_tokens: 0, speculation: None, cached_tokens: 0 };
            let _ = tx.send(end);
            receivers.push((*index, rx, echo.clone()));
            continue;
        }
        match choice::start(&state, request.clone(), job.stops.clone(), job.logprobs, started) {
            Ok(rx) => receivers.push((*index, rx, echo.clone())),
            Err(e) => return e.into_response(), // started choices are cancelled as their receivers drop
        }
    }
    let id = format!(
        "{}-{}",
        if job.endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" },
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    if job.stream {
        return stream_response(state, job, id, receivers).into_response();
    }
    let mut choices = Vec::new();
    let mut counted = Counted::default();
    for (index, mut rx, echo) in receivers {
        let mut text = echo.unwrap_or_default();
        // With the prompt's logprobs, offsets count from the echoed prompt's start.
        let mut tokens = job.prompt_logprobs.get(index / job.n).cloned().unwrap_or_default();
        let offset0 = if tokens.is_empty() { text.len() } else { 0 };
        let mut finish = "stop";
        while let Some(ev) = rx.recv().await {
            match ev {
                ChoiceEvent::Delta { text: t, tokens: ts } => {
                    text.push_str(&t);
                    tokens.extend(ts);
                }
                ChoiceEvent::End { finish_reason, completion_tokens: n, speculation, cached_tokens } => {
                    finish = finish_reason;
                    let first = index % job.n == 0;
                    counted.add(n, speculation, if first { cached_tokens } else { 0 });
                }
                ChoiceEvent::Error(m) => return ApiError::internal(format!("generation failed: {m}")).into_response(),
            }
        }
        choices.push(match job.endpoint {
            Endpoint::Completions => json!({
                "index": index, "text": text, "finish_reason": finish,
                "logprobs": if job.logprobs { completion_logprobs(&tokens, offset0) } else { Value::Null },
            }),
            Endpoint::Chat => {
                let (message, finish) = match &job.tool_calls {
                    Some(tools) => crate::tools::answer(&text, tools, &format!("{id}_{index}"), finish),
                    None => (json!({"role": "assistant", "content": text}), finish),
                };
                json!({
                    "index": index, "message": message, "finish_reason": finish,
                    "logprobs": if job.logprobs { chat_logprobs(&tokens) } else { Value::Null },
                })
            }
        });
    }
    let object = if job.endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" };
    Json(json!({
        "id": id, "object": object, "created": now_secs(), "model": state.model_name,
        "system_fingerprint": job.fingerprint, "choices": choices, "usage": usage(job.prompt_tokens, counted),
    }))
    .into_response()
}

type ChoiceRx = tokio::sync::mpsc::UnboundedReceiver<ChoiceEvent>;

fn stream_response(
    state: Arc<AppState>,
    job: Job,
    id: String,
    receivers: Vec<(usize, ChoiceRx, Option<String>)>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let chat = job.endpoint == Endpoint::Chat;
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let created = now_secs();
    let model = state.model_name.clone();
    let usage_id = id.clone();
    let fingerprint = job.fingerprint.clone();
    let chunk = move |choice: Value| {
        SseEvent::default().data(
            json!({"id": id, "object": object, "created": created, "model": model,
                   "system_fingerprint": fingerprint, "choices": [choice]})
            .to_string(),
        )
    };
    let (logprobs, n, tool_calls) = (job.logprobs, job.n, job.tool_calls.clone());
    let prompt_logprobs = job.prompt_logprobs.clone();
    let call_id = usage_id.clone();
    // One stream per choice: an opening chunk (role, or echoed prompt), deltas, a closing chunk.
    let per_choice = receivers.into_iter().map(move |(index, rx, echo)| {
        let chunk = chunk.clone();
        // A chat that offered tools: calls are held back from the content and sent whole at the end.
        let mut tools = tool_calls.clone().map(crate::tools::ToolStream::new);
        let call_id = format!("{call_id}_{index}");
        // Where the next token's text starts in the choice's whole text (completions logprobs).
        let mut text_offset = echo.as_ref().map_or(0, String::len);
        let opening = if chat {
            Some(json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
        } else {
            let lp = prompt_logprobs.get(index / n).map_or(Value::Null, |p| completion_logprobs(p, 0));
            echo.map(|e| json!({"index": index, "text": e, "logprobs": lp, "finish_reason": null}))
        };
        let opening = stream::iter(opening.map(|c| (chunk(c.clone()), Counted::default())));
        let body = stream::unfold(rx, |mut rx| async move {
            let ev = rx.recv().await?;
            Some((ev, rx))
        })
        .map(move |ev| match ev {
            ChoiceEvent::Delta { text, tokens } => {
                let lp = if !logprobs {
                    Value::Null
                } else if chat {
                    chat_logprobs(&tokens)
                } else {
                    let lp = completion_logprobs(&tokens, text_offset);
                    text_offset += tokens.iter().map(|t| t.token.len()).sum::<usize>();
                    lp
                };
                let text = match &mut tools {
                    Some(t) => t.push(&text),
                    None => text,
                };
                let c = if chat {
                    json!({"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": null})
                } else {
                    json!({"index": index, "text": text, "logprobs": lp, "finish_reason": null})
                };
                (chunk(c), Counted::default())
            }
            ChoiceEvent::End { finish_reason, completion_tokens, speculation, cached_tokens } => {
                let c = if let Some(t) = &tools {
                    let (delta, finish_reason) = t.end(&call_id, finish_reason);
                    json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
                } else if chat {
                    json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish_reason})
                } else {
                    json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish_reason})
                };
                let mut counted = Counted::default();
                counted.add(completion_tokens, speculation, if index % n == 0 { cached_tokens } else { 0 });
                (chunk(c), counted)
            }
            ChoiceEvent::Error(m) => (
                SseEvent::default().data(ApiError::internal(format!("generation failed: {m}")).body().to_string()),
                Counted::default(),
            ),
        });
        opening.chain(body)
    });
    let merged = stream::select_all(per_choice.map(|s| s.boxed()));
    let prompt_tokens = job.prompt_tokens;
    let include_usage = job.include_usage;
    let model = state.model_name.clone();
    let events = merged
        .scan(Counted::default(), |total, (event, n): (SseEvent, Counted)| {
            total.add(n.completion, n.speculation, n.cached);
            futures::future::ready(Some((event, *total)))
        })
        .map(Some)
        .chain(stream::once(async { None }))
        .scan(Counted::default(), move |last, item| {
            let out = match item {
                Some((event, completion)) => {
                    *last = completion;
                    vec![event]
                }
                None => {
                    let mut tail = Vec::new();
                    if include_usage {
                        tail.push(
                            SseEvent::default().data(
                                json!({"id": usage_id, "object": object, "created": created, "model": model,
                                   "choices": [], "usage": usage(prompt_tokens, *last)})
                                .to_string(),
                            ),
                        );
                    }
                    tail.push(SseEvent::default().data("[DONE]"));
                    tail
                }
            };
            futures::future::ready(Some(stream::iter(out)))
        })
        .flatten()
        .map(Ok);
    Sse::new(events).keep_alive(KeepAlive::default())
}

pub async fn models(State(server): Shared) -> Json<Value> {
    Json(json!({"object": "list", "data": model_objects(&server)}))
}

/// One model by name (OpenAI's `GET /v1/models/{model}`; a hub name's `/` included).
pub async fn model(State(server): Shared, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    match model_objects(&server).into_iter().find(|m| m["id"] == id.as_str()) {
        Some(m) => Json(m).into_response(),
        None => ApiError::not_found(format!("the model `{id}` does not exist")).into_response(),
    }
}

/// What /v1/models lists: every served model, then every evolving one.
fn model_objects(server: &Server) -> Vec<Value> {
    let mut data: Vec<Value> = server
        .models
        .iter()
        .map(|m| {
            json!({"id": m.model_name, "object": "model", "created": m.created, "owned_by": "tandem",
                   "max_model_len": m.engine.config().max_seq_len})
        })
        .collect();
    for v in &server.evolving {
        data.push(json!({"id": v.name, "object": "model", "created": server.first().created, "owned_by": "tandem",
                         "tandem_evolve": v.describe()}));
    }
    data
}

/// 200 while every engine serves; 503 once one's thread has stopped (a load balancer then stops
/// sending traffic here instead of collecting errors).
pub async fn health(State(server): Shared) -> Response {
    match server.models.iter().find(|m| !m.engine.is_alive()) {
        None => Json(json!({"status": "ok"})).into_response(),
        Some(m) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "unhealthy", "error": format!("the engine thread of `{}` has stopped", m.model_name)}),
            ),
        )
            .into_response(),
    }
}

/// Each model's series; with several models each sample carries a `model` label (request counts,
/// which are the server's, excepted).
pub async fn metrics(State(server): Shared) -> Response {
    let parts: Vec<(String, String)> =
        server.models.iter().map(|state| (state.model_name.clone(), state.metrics.render(&gauges(state)))).collect();
    let mut text = match parts.len() {
        1 => parts.into_iter().next().map(|p| p.1).unwrap_or_default(),
        _ => crate::metrics::merge_models(&parts),
    };
    for v in &server.evolving {
        v.render_metrics(&mut text);
    }
    for extra in &server.controls.metrics {
        text.push_str(&extra());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn gauges(state: &AppState) -> EngineGauges {
    EngineGauges {
        waiting: state.engine.waiting(),
        running: state.engine.running(),
        kv: state.engine.kv_usage(),
        kv_bytes_per_block: state.kv_bytes_per_block,
        spec: state.engine.spec_stats(),
        policy: state.engine.policy_name(),
        service: state.engine.service(),
        waiting_by_client: state.engine.waiting_by_client(),
        preemptions: state.engine.preemptions(),
        online: state.online.clone(),
    }
}
