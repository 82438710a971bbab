//! Evolving models (`tandem serve --evolve NAME=config.json`): a chat completion whose answer is
//! evolved by RSA or Squeeze Evolve over the served models (`tandem_evolve`). Every child
//! generation and score goes through the models' engines under the caller's client and agent,
//! so the fair scheduler charges the evolution to whoever asked; the question comes first in
//! every prompt, so the prefix cache computes it once per model; a client that disconnects
//! cancels everything in flight.
use crate::api::{ChatRequest, Common};
use crate::error::ApiError;
use crate::prompt::{chat_messages, chat_prompt, tokenize};
use crate::score::score_ids;
use crate::AppState;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tandem_engine::{Event, GenerationRequest};
use tandem_evolve::{Backend, Cost, EvolveConfig, GenerateCall, Generated, Outcome, Round, ScoreCall, Scored};
use tandem_runtime::{Message, SamplingParams};

/// One evolving model: its configuration, the served models it uses, and its counters.
pub struct Evolving {
    pub name: String,
    pub config: EvolveConfig,
    models: Vec<(String, Arc<AppState>)>,
    requests: AtomicU64,
    rounds: AtomicU64,
    /// Tokens spent per model (scoring under "MODEL (score)").
    spent: Mutex<BTreeMap<String, Cost>>,
}

impl Evolving {
    /// `models`: every model the configuration names, by that name.
    pub fn new(name: String, config: EvolveConfig, models: Vec<(String, Arc<AppState>)>) -> Self {
        Evolving {
            name,
            config,
            models,
            requests: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            spent: Mutex::new(BTreeMap::new()),
        }
    }

    /// The settings /v1/models shows.
    pub fn describe(&self) -> Value {
        let c = &self.config;
        json!({"method": if c.tiers.len() == 1 { "rsa" } else { "squeeze-evolve" }, "n": c.n, "k": c.k, "t": c.t,
               "tiers": c.tiers, "percentile": c.percentile, "vote_percentile": c.vote_percentile,
               "scorer": c.scores().then(|| c.scorer()), "max_tokens": c.max_tokens})
    }

    /// The backend of one request: the models' engines, charged to its caller.
    pub fn backend(&self, client: Option<String>, agent: Option<String>) -> Calls {
        Calls { models: self.models.clone(), client, agent }
    }

    /// Runs one evolution (the benchmark calls this directly; the chat route through `chat`).
    pub async fn run(
        &self,
        backend: &Calls,
        question: &str,
        seed: u64,
        progress: &mut (dyn FnMut(&Round) + Send),
    ) -> Result<Outcome, String> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let out = tandem_evolve::evolve(&self.config, backend, question, seed, progress).await?;
        self.rounds.fetch_add(out.rounds.len() as u64, Ordering::Relaxed);
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        for (m, c) in &out.cost {
            *spent.entry(m.clone()).or_default() += *c;
        }
        Ok(out)
    }

    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let name = self.name.replace('"', "");
        let _ = writeln!(
            out,
            "# HELP tandem_evolve_requests_total Evolutions run.\n# TYPE tandem_evolve_requests_total counter\ntandem_evolve_requests_total{{evolve=\"{name}\"}} {}",
            self.requests.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tandem_evolve_rounds_total Rounds completed.\n# TYPE tandem_evolve_rounds_total counter\ntandem_evolve_rounds_total{{evolve=\"{name}\"}} {}",
            self.rounds.load(Ordering::Relaxed)
        );
        let metric = "tandem_evolve_tokens_total";
        let _ = writeln!(out, "# HELP {metric} Tokens evolutions spent, per model and kind (scoring is prompt only).\n# TYPE {metric} counter");
        for (model, c) in self.spent.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let model = model.replace('"', "");
            for (kind, n) in
                [("prompt", c.prompt_tokens), ("cached", c.cached_tokens), ("completion", c.completion_tokens)]
            {
                let _ = writeln!(out, "{metric}{{evolve=\"{name}\",model=\"{model}\",kind=\"{kind}\"}} {n}");
            }
        }
    }
}

/// The served models as an evolution's backend, every call charged to one client and agent.
pub struct Calls {
    models: Vec<(String, Arc<AppState>)>,
    client: Option<String>,
    agent: Option<String>,
}

impl Calls {
    fn model(&self, name: &str) -> Result<Arc<AppState>, String> {
        self.models.iter().find(|m| m.0 == name).map(|m| m.1.clone()).ok_or_else(|| format!("no model `{name}`"))
    }
}

fn user(text: &str) -> Vec<Message> {
    vec![Message::new("user", text)]
}

impl Backend for Calls {
    fn generate(&self, call: GenerateCall) -> BoxFuture<'static, Result<Generated, String>> {
        let (state, client, agent) = (self.model(&call.model), self.client.clone(), self.agent.clone());
        Box::pin(async move {
            let state = state?;
            let prompt = chat_prompt(&state, &user(&call.prompt)).map_err(|e| e.message)?;
            let limit = state.engine.config().max_seq_len;
            let request = GenerationRequest {
                max_tokens: call.max_tokens.min(limit.saturating_sub(prompt.len())).max(1),
                prompt,
                sampling: SamplingParams { temperature: call.temperature, seed: Some(call.seed), ..Default::default() },
                stop_token_ids: state.stop_token_ids.clone(),
                client,
                agent,
                weights: None,
                score: None,
            };
            let mut rx = state.engine.submit(request).map_err(|e| e.to_string())?;
            let mut ids = Vec::new();
            let usage = loop {
                match rx.recv().await {
                    Some(Event::Token(t)) => ids.push(t.id),
                    Some(Event::Finished { usage, .. }) => break usage,
                    Some(Event::Failed(m)) => return Err(format!("generation failed: {m}")),
                    Some(Event::Scored(_)) => {}
                    None => return Err("the engine stopped".into()),
                }
            };
            let m = &state.metrics;
            m.prompt_tokens.fetch_add((usage.prompt_tokens - usage.cached_tokens) as u64, Ordering::Relaxed);
            m.generation_tokens.fetch_add(ids.len() as u64, Ordering::Relaxed);
            let text = state.tokenizer.decode(&ids, true).map_err(|e| e.to_string())?;
            let cost = Cost {
                calls: 1,
                prompt_tokens: usage.prompt_tokens,
                cached_tokens: usage.cached_tokens,
                completion_tokens: usage.completion_tokens,
            };
            Ok(Generated { text, cost })
        })
    }

    fn score(&self, call: ScoreCall) -> BoxFuture<'static, Result<Scored, String>> {
        let (state, client, agent) = (self.model(&call.model), self.client.clone(), self.agent.clone());
        Box::pin(async move {
            let state = state?;
            let prompt = chat_prompt(&state, &user(&call.prompt)).map_err(|e| e.message)?;
            let ids: Vec<Vec<u32>> =
                call.candidates.iter().map(|c| tokenize(&state, c)).collect::<Result<_, _>>().map_err(|e| e.message)?;
            // An empty candidate (the model stopped at once) has nothing to be confident about.
            let scored: Vec<usize> = (0..ids.len()).filter(|&i| !ids[i].is_empty()).collect();
            let asked = scored.iter().map(|&i| ids[i].clone()).collect();
            let outcomes = score_ids(&state, &prompt, asked, call.top_k, client, agent).await.map_err(|e| e.message)?;
            let mut confidence = vec![0.0; ids.len()];
            let mut cost = Cost::default();
            for (&i, o) in scored.iter().zip(&outcomes) {
                confidence[i] = o.confidence();
                cost += Cost {
                    calls: 1,
                    prompt_tokens: o.usage.prompt_tokens,
                    cached_tokens: o.usage.cached_tokens,
                    completion_tokens: 0,
                };
            }
            Ok(Scored { confidence, cost })
        })
    }
}

/// Aborts a spawned evolution when the response (or its stream) is dropped: the client went
/// away, so its generations are cancelled.
struct AbortOnDrop(tokio::task::AbortHandle);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The question an evolving model answers: the user's one message, after any system messages.
fn question(req: &ChatRequest) -> Result<String, ApiError> {
    let messages = chat_messages(&req.messages)?;
    let users = messages.iter().filter(|m| m.role == "user").count();
    if users != 1 || messages.iter().any(|m| m.role != "user" && m.role != "system") {
        return Err(ApiError::bad_request(
            "an evolving model answers one question: send one user message (after optional system messages)",
            Some("messages"),
        ));
    }
    let parts: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    Ok(parts.join("\n\n"))
}

/// Fields an evolution cannot honour are refused rather than ignored.
fn refuse(req: &ChatRequest, c: &Common) -> Result<(), ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("an evolving model gives one answer: `n` must be 1", Some("n")));
    }
    if req.logprobs.unwrap_or(false) {
        return Err(ApiError::bad_request("an evolved answer has no logprobs", Some("logprobs")));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::bad_request("an evolving model's answers call no tools", Some("tools")));
    }
    if let Some((_, param)) = crate::structured::requested(c)? {
        return Err(ApiError::bad_request("an evolving model's answers are not held to a grammar", Some(param)));
    }
    if req.continue_final_message.unwrap_or(false) || req.add_generation_prompt == Some(false) {
        return Err(ApiError::bad_request(
            "an evolving model answers a question: it does not continue a message",
            Some("continue_final_message"),
        ));
    }
    Ok(())
}

/// The chat completion of an evolving model.
pub async fn chat(v: Arc<Evolving>, req: ChatRequest, common: Common, started: Instant) -> Response {
    let prepared = refuse(&req, &common).and_then(|_| question(&req)).and_then(|q| {
        // The question must leave the aggregation prompts their room (`EvolveConfig::check_models`).
        let first = v.models.first().map(|m| m.1.clone()).ok_or_else(|| ApiError::internal("no model"))?;
        let len = chat_prompt(&first, &user(&q))?.len();
        match len > tandem_evolve::config::MAX_QUESTION {
            true => Err(ApiError::bad_request(
                format!(
                    "the question has {len} tokens; an evolving model takes at most {}",
                    tandem_evolve::config::MAX_QUESTION
                ),
                Some("messages"),
            )),
            false => Ok(q),
        }
    });
    let q = match prepared {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let seed = common.seed.or(v.config.seed).unwrap_or_else(rand::random);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Round>();
    let backend = v.backend(common.client.clone(), common.agent.clone());
    let runner = v.clone();
    let task = tokio::spawn(async move {
        let mut progress = |r: &Round| {
            let _ = tx.send(r.clone());
        };
        runner.run(&backend, &q, seed, &mut progress).await
    });
    let guard = AbortOnDrop(task.abort_handle());
    let id = format!("chatcmpl-evolve-{}", v.requests.load(Ordering::Relaxed));
    if common.stream.unwrap_or(false) {
        let include_usage = common.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return stream(v, id, rx, task, guard, include_usage).into_response();
    }
    let result = task.await;
    drop(guard);
    match result {
        Ok(Ok(out)) => {
            let usage = usage(&out, started);
            Json(json!({
                "id": id, "object": "chat.completion", "created": now(), "model": v.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": "stop",
                             "logprobs": null}],
                "usage": usage,
            }))
            .into_response()
        }
        Ok(Err(e)) => ApiError::internal(format!("the evolution failed: {e}")).into_response(),
        Err(e) => ApiError::internal(format!("the evolution stopped: {e}")).into_response(),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// OpenAI's usage over every call the evolution made, and a `tandem_evolve` extension: the
/// answer, its votes, each round's majority and routing, and the tokens per model.
fn usage(out: &Outcome, started: Instant) -> Value {
    let t = out.total();
    json!({
        "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
        "total_tokens": t.prompt_tokens + t.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": t.cached_tokens},
        "tandem_evolve": {
            "answer": out.answer, "votes": out.votes, "calls": t.calls, "seconds": started.elapsed().as_secs_f64(),
            "rounds": out.rounds.iter().map(round_summary).collect::<Vec<_>>(),
            "by_model": out.cost,
        },
    })
}

/// A round as progress: its majority answer and votes, and where its groups went.
fn round_summary(r: &Round) -> Value {
    let mut routed: BTreeMap<String, usize> = BTreeMap::new();
    for g in &r.groups {
        let key = match g.route {
            tandem_evolve::Route::Tier(i) => format!("tier{i}"),
            tandem_evolve::Route::Vote => "vote".into(),
        };
        *routed.entry(key).or_default() += 1;
    }
    json!({"round": r.round, "majority": r.majority.as_ref().map(|m| &m.0), "votes": r.majority.as_ref().map(|m| m.1),
           "answers": r.answers, "routed": routed})
}

/// The streamed form: a chunk per finished round (its summary as `tandem_evolve`, and a line of
/// `reasoning_content` that chat UIs show as progress), then the answer, then usage and [DONE].
fn stream(
    v: Arc<Evolving>,
    id: String,
    rounds: tokio::sync::mpsc::UnboundedReceiver<Round>,
    task: tokio::task::JoinHandle<Result<Outcome, String>>,
    guard: AbortOnDrop,
    include_usage: bool,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let started = Instant::now();
    let (name, t, created) = (v.name.clone(), v.config.t, now());
    let usage_chunk = {
        let (id, name) = (id.clone(), name.clone());
        move |u: Value| {
            let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                           "choices": [], "usage": u});
            SseEvent::default().data(c.to_string())
        }
    };
    let chunk = move |delta: Value, finish: Option<&str>, extra: Option<(&str, Value)>| {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                           "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if let Some((k, val)) = extra {
            c[k] = val;
        }
        SseEvent::default().data(c.to_string())
    };
    let opening = futures::stream::once({
        let chunk = chunk.clone();
        async move { chunk(json!({"role": "assistant", "content": ""}), None, None) }
    });
    let rounds = futures::stream::unfold(rounds, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let progress = rounds.map({
        let chunk = chunk.clone();
        move |r| {
            let line = match &r.majority {
                Some((a, n)) => format!("round {}/{t}: majority answer {a} ({n} votes)\n", r.round),
                None => format!("round {}/{t}: no answer yet\n", r.round),
            };
            chunk(json!({"reasoning_content": line}), None, Some(("tandem_evolve", round_summary(&r))))
        }
    });
    let ending =
        futures::stream::once(async move {
            let _guard = guard;
            match task.await {
                Ok(Ok(out)) => {
                    let mut events =
                        vec![chunk(json!({"content": out.text}), None, None), chunk(json!({}), Some("stop"), None)];
                    if include_usage {
                        events.push(usage_chunk(usage(&out, started)));
                    }
                    events
                }
                Ok(Err(e)) => vec![SseEvent::default()
                    .data(ApiError::internal(format!("the evolution failed: {e}")).body().to_string())],
                Err(e) => vec![SseEvent::default()
                    .data(ApiError::internal(format!("the evolution stopped: {e}")).body().to_string())],
            }
        })
        .flat_map(futures::stream::iter);
    let done = futures::stream::once(async { SseEvent::default().data("[DONE]") });
    Sse::new(opening.chain(progress).chain(ending).chain(done).map(Ok)).keep_alive(KeepAlive::default())
}
