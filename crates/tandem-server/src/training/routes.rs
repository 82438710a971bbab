//! HTTP routes of the training API: the Tinker SDK's (JSON, with protobuf for forward_backward and
//! for forward_backward and sample results) and the JSON forms xorl-client sends. Bodies decode
//! into the typed requests of `requests.rs`.
use super::futures::Poll;
use super::proto;
use super::requests::{self as req, StopIn, StopItem};
use super::results::Outcome;
use super::service::{Failure, FailureKind, SampleRequest, Stop, TrainingService, Work};
use crate::auth::Identity;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use prost::Message;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tandem_models::{LoraSpec, LoraTargets};
use tandem_train::{AdamParams, ConfigValue, Datum, LossFn, Mode};

type S = State<Arc<TrainingService>>;

/// How long retrieve_future holds a poll open before answering try_again.
const HOLD: Duration = Duration::from_secs(25);

/// An HTTP error with a JSON body both clients understand (`detail`); never an empty 400,
/// which the Tinker SDK would retry as a proxy glitch.
struct HttpError(StatusCode, String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"detail": self.1}))).into_response()
    }
}

fn bad(msg: impl Into<String>) -> HttpError {
    HttpError(StatusCode::BAD_REQUEST, msg.into())
}

impl From<Failure> for HttpError {
    fn from(f: Failure) -> Self {
        let status = match f.kind {
            FailureKind::Conflict => StatusCode::CONFLICT,
            FailureKind::Busy => StatusCode::TOO_MANY_REQUESTS,
            FailureKind::User => StatusCode::BAD_REQUEST,
            FailureKind::Server => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError(status, f.message)
    }
}

type Reply = Result<Json<Value>, HttpError>;

pub fn router(service: Arc<TrainingService>) -> Router {
    Router::new()
        .route("/api/v1/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/api/v1/client/config", post(|| async { Json(json!({})) }))
        .route("/api/v1/client/dynamic_config", post(|| async { Json(json!({})) }))
        .route("/api/v1/telemetry", post(|| async { Json(json!({"status": "accepted"})) }))
        .route("/api/v1/create_session", post(create_session))
        .route("/api/v1/session_heartbeat", post(heartbeat))
        .route("/api/v1/sessions/{id}/finish", post(|| async { Json(json!({})) }))
        .route("/api/v1/get_server_capabilities", get(capabilities))
        .route("/api/v1/create_model", post(create_model))
        .route("/api/v1/get_info", post(get_info))
        .route("/api/v1/forward_backward", post(forward_backward))
        .route("/api/v1/forward", post(forward))
        .route("/api/v1/optim_step", post(optim_step))
        .route("/api/v1/save_weights", post(save_weights))
        .route("/api/v1/save_weights_for_sampler", post(save_weights_for_sampler))
        .route("/api/v1/load_weights", post(load_weights))
        .route("/api/v1/create_sampling_session", post(create_sampling_session))
        .route("/api/v1/samplers/{id}", get(get_sampler))
        .route("/api/v1/asample", post(asample))
        .route("/api/v1/retrieve_future", post(retrieve_future))
        .route("/api/v1/training_runs/{run}/checkpoints", get(list_checkpoints))
        .route("/api/v1/training_runs/{run}/checkpoints/{*checkpoint}", delete(delete_checkpoint))
        .route("/api/v1/unload_model", post(unload_model))
        .route("/api/v1/weights_info", post(weights_info))
        .route("/generate", post(generate))
        .route("/tandem/v1/export", post(export))
        .with_state(service)
}

fn body_json(body: &Bytes) -> Result<Value, HttpError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    Ok(v)
}

/// `v` as a `T`; the error names the field that is missing or of the wrong type.
fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(|e| match e.path().to_string().as_str() {
        "." => e.inner().to_string(),
        path => format!("`{path}`: {}", e.inner()),
    })
}

/// The body as a typed request (a 400 naming the field when it is not one).
fn typed<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, HttpError> {
    decode(body_json(body)?).map_err(bad)
}

fn future_reply(id: String, model_id: Option<&str>) -> Json<Value> {
    match model_id {
        Some(m) => Json(json!({"request_id": id, "model_id": m})),
        None => Json(json!({"request_id": id})),
    }
}

async fn create_session(State(s): S, body: Bytes) -> Reply {
    // Its fields (tags, metadata, SDK version) are informational, but the body must be JSON.
    if !body.is_empty() {
        body_json(&body)?;
    }
    Ok(Json(json!({"type": "create_session", "session_id": s.create_session()})))
}

async fn heartbeat(State(s): S, body: Bytes) -> Reply {
    let r: req::SessionRef = typed(&body)?;
    s.heartbeat(&r.session_id)?;
    Ok(Json(json!({"type": "session_heartbeat"})))
}

async fn capabilities(State(s): S) -> Json<Value> {
    Json(json!({"supported_models": [{
        "model_name": s.base_name,
        "max_context_length": s.engine.config().max_seq_len,
        "trainable": true,
        "sampleable": true,
    }]}))
}

async fn create_model(State(s): S, body: Bytes) -> Reply {
    let r: req::CreateModel = typed(&body)?;
    let seq = match (&r.session_id, r.model_seq_id) {
        (Some(_), None) => return Err(bad("`model_seq_id` is required with `session_id`")),
        (_, seq) => seq.unwrap_or(0),
    };
    let outcome = (|| -> Result<Outcome, Failure> {
        s.check_base(r.base_model.as_deref().unwrap_or(""))?;
        if let Some(t) = r.optimizer_config.as_ref().and_then(|o| o.kind.as_deref()) {
            if t != "adamw" && t != "adam" {
                return Err(Failure::user(format!("optimizer `{t}` is not supported (adamw is)")));
            }
        }
        let (mode, seed) = match &r.lora_config {
            None => (Mode::Full, 0),
            Some(c) => {
                if c.dropout.is_some_and(|d| d != 0.0) {
                    return Err(Failure::user("LoRA dropout is not supported (use 0)"));
                }
                let on = |flag: Option<bool>| flag.unwrap_or(true);
                let targets =
                    LoraTargets { attn: on(c.train_attn), mlp: on(c.train_mlp), unembed: on(c.train_unembed) };
                let spec = LoraSpec { rank: c.rank as usize, alpha: c.alpha.unwrap_or(32.0), targets };
                (Mode::Lora(spec), c.seed.unwrap_or(0))
            }
        };
        let id = match &r.session_id {
            Some(session) => s.create_model(session, seq, mode, seed)?,
            None => s.create_named_model(r.model_id.as_deref().unwrap_or("default"), mode, seed)?,
        };
        Ok(Outcome::Json(json!({"model_id": id, "type": "create_model"})))
    })();
    let model_id = match &outcome {
        Ok(Outcome::Json(j)) => j["model_id"].as_str().map(String::from),
        _ => None,
    };
    let id = s.immediate(outcome.unwrap_or_else(Outcome::from));
    Ok(future_reply(id, model_id.as_deref()))
}

async fn get_info(State(s): S, body: Bytes) -> Reply {
    let r: req::ModelRef = typed(&body)?;
    let model = s.model(&r.model_id)?;
    let (is_lora, rank) = match model.mode {
        Mode::Lora(spec) => (true, Some(spec.rank)),
        Mode::Full => (false, None),
    };
    Ok(Json(json!({
        "type": "get_info",
        "model_id": model.id,
        "model_data": {
            "arch": format!("{:?}", s.base.config.architecture).to_lowercase(),
            "model_name": s.base_name,
            "tokenizer_id": s.config.tokenizer_dir.as_ref().or(s.config.model_dir.as_ref()).map(|d| d.display().to_string()),
        },
        "is_lora": is_lora,
        "lora_rank": rank,
    })))
}

/// Builds training data from per-datum tokens and named inputs (`target_tokens` among them).
fn datum(i: usize, tokens: Vec<u32>, mut inputs: BTreeMap<String, Vec<f64>>) -> Result<Datum, String> {
    let targets =
        inputs.remove("target_tokens").ok_or_else(|| format!("datum {i}: loss_fn_inputs needs `target_tokens`"))?;
    let targets = targets
        .iter()
        .map(|&t| {
            if t >= 0.0 && t.fract() == 0.0 && t <= u32::MAX as f64 {
                Ok(t as u32)
            } else {
                Err(format!("datum {i}: bad target token {t}"))
            }
        })
        .collect::<Result<Vec<u32>, String>>()?;
    let inputs = inputs.into_iter().map(|(k, v)| (k, v.into_iter().map(|x| x as f32).collect())).collect();
    Ok(Datum { tokens, targets, inputs })
}

/// A forward_backward request in any of its encodings.
struct FbRequest {
    model_id: String,
    seq_id: i64,
    work: Result<Work, String>,
}

fn decode_proto(body: &Bytes) -> Result<FbRequest, HttpError> {
    let m = proto::ForwardBackwardRequest::decode(body.as_ref())
        .map_err(|e| bad(format!("the protobuf body does not decode: {e}")))?;
    let work = (|| -> Result<Work, String> {
        let mut config = BTreeMap::new();
        for (k, v) in &m.loss_fn_config {
            config.insert(k.clone(), ConfigValue::Number(*v));
        }
        for (k, v) in &m.loss_fn_config_v2 {
            match &v.value {
                Some(proto::loss_config_value::Value::Number(x)) => config.insert(k.clone(), ConfigValue::Number(*x)),
                Some(proto::loss_config_value::Value::Text(t)) => {
                    config.insert(k.clone(), ConfigValue::Text(t.clone()))
                }
                None => None,
            };
        }
        let loss = LossFn::parse(&m.loss_fn, &config)?;
        let mut data = Vec::with_capacity(m.data.len());
        for (i, d) in m.data.iter().enumerate() {
            let mut tokens = Vec::new();
            for c in &d.model_input {
                match &c.chunk {
                    Some(proto::chunk::Chunk::EncodedText(t)) => {
                        if t.tokens.len() % 4 != 0 {
                            return Err(format!("datum {i}: token bytes are not int32s"));
                        }
                        for b in t.tokens.chunks_exact(4) {
                            let id = i32::from_le_bytes(b.try_into().expect("4 bytes"));
                            if id < 0 {
                                return Err(format!("datum {i}: negative token id {id}"));
                            }
                            tokens.push(id as u32);
                        }
                    }
                    Some(_) => {
                        return Err(format!("datum {i}: image and audio chunks are not supported (text models)"))
                    }
                    None => return Err(format!("datum {i}: an empty chunk")),
                }
            }
            let mut inputs = BTreeMap::new();
            for (k, t) in &d.loss_fn_inputs {
                let (values, _) = proto::tensor_values(t).map_err(|e| format!("datum {i}: `{k}`: {e}"))?;
                inputs.insert(k.clone(), values);
            }
            data.push(datum(i, tokens, inputs)?);
        }
        Ok(Work::ForwardBackward { data, loss, forward_only: m.forward_only })
    })();
    Ok(FbRequest { model_id: m.model_id, seq_id: m.seq_id as i64, work })
}

/// A JSON forward_backward (or forward): the model and seq_id must decode (without them the
/// request has no place to fail in); anything wrong in the rest fails in its turn.
fn decode_json(body: &Bytes, forward_only: bool) -> Result<FbRequest, HttpError> {
    let v = body_json(body)?;
    let q: req::Queued = decode(v.clone()).map_err(bad)?;
    let work = decode::<req::ForwardBackward>(v).and_then(|r| {
        let forward_only = forward_only || r.forward_only.unwrap_or(false);
        let input = r.forward_backward_input.unwrap_or(r.inline);
        let config = input.loss_fn_config.unwrap_or_default().into_iter().map(|(k, c)| (k, c.into())).collect();
        let loss = LossFn::parse(input.loss_fn.as_deref().unwrap_or("cross_entropy"), &config)?;
        let items = input.data.ok_or("`data` (an array of datums) is required")?;
        let mut data = Vec::with_capacity(items.len());
        for (i, d) in items.into_iter().enumerate() {
            let tokens = d.model_input.tokens().map_err(|e| format!("datum {i}: {e}"))?;
            let inputs = d.loss_fn_inputs.into_iter().map(|(k, t)| (k, t.values())).collect();
            data.push(datum(i, tokens, inputs)?);
        }
        Ok(Work::ForwardBackward { data, loss, forward_only })
    });
    Ok(FbRequest { model_id: q.model_id, seq_id: q.seq_id, work })
}

fn is_proto(headers: &HeaderMap, key: header::HeaderName) -> bool {
    headers.get(key).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/x-protobuf"))
}

/// Queues a training request; bad input becomes a failed future (category user), so the caller
/// sees the error where it waits for the result, and serving is never disturbed. `identity`: who
/// asked, whom the scheduling policy charges for the work.
fn submit(
    s: &TrainingService,
    identity: Option<Extension<Identity>>,
    model_id: &str,
    seq: i64,
    work: Result<Work, String>,
) -> Reply {
    let model = match s.model(model_id) {
        Ok(m) => m,
        Err(f) => return Ok(future_reply(s.immediate(f.into()), Some(model_id))),
    };
    let client = super::service::tinker_client(identity.and_then(|i| i.0.key_client), model.session());
    let id = match work {
        Ok(w) => s.submit(&model, seq, w, client)?,
        // The failure still takes its turn, so later seq_ids are not held up.
        Err(e) => s.submit(&model, seq, Work::Fail(e), client)?,
    };
    Ok(future_reply(id, Some(model_id)))
}

async fn forward_backward(
    State(s): S,
    identity: Option<Extension<Identity>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    if headers.get(header::CONTENT_ENCODING).is_some() {
        return Err(HttpError(StatusCode::UNSUPPORTED_MEDIA_TYPE, "compressed bodies are not supported".into()));
    }
    let r = if is_proto(&headers, header::CONTENT_TYPE) { decode_proto(&body)? } else { decode_json(&body, false)? };
    submit(&s, identity, &r.model_id, r.seq_id, r.work)
}

async fn forward(State(s): S, identity: Option<Extension<Identity>>, body: Bytes) -> Reply {
    let r = decode_json(&body, true)?;
    submit(&s, identity, &r.model_id, r.seq_id, r.work)
}

async fn optim_step(State(s): S, identity: Option<Extension<Identity>>, body: Bytes) -> Reply {
    let q: req::Queued = typed(&body)?;
    // A field present with the wrong type is the caller's error, never replaced by a default.
    let r: req::OptimStep = typed(&body)?;
    let params = AdamParams::from(r.adam_params.unwrap_or_default());
    submit(&s, identity, &q.model_id, q.seq_id, Ok(Work::OptimStep(params)))
}

async fn save_weights(State(s): S, body: Bytes) -> Reply {
    let q: req::Queued = typed(&body)?;
    let r: req::SaveWeights = typed(&body)?;
    let name = r.path.unwrap_or_else(|| format!("step-{}", q.seq_id));
    submit(&s, None, &q.model_id, q.seq_id, Ok(Work::SaveWeights { name }))
}

async fn save_weights_for_sampler(State(s): S, body: Bytes) -> Reply {
    let q: req::Queued = typed(&body)?;
    let r: req::SaveWeights = typed(&body)?;
    let session = q.model_id.split(':').next().map(String::from);
    submit(&s, None, &q.model_id, q.seq_id, Ok(Work::SaveForSampler { name: r.path, session }))
}

async fn load_weights(State(s): S, body: Bytes) -> Reply {
    let r: req::LoadWeights = typed(&body)?;
    let (path, optimizer) = (r.path, r.optimizer);
    if let Some(model_id) = r.model_id {
        let seq = r.seq_id.ok_or_else(|| bad("`seq_id` is required with `model_id`"))?;
        return submit(&s, None, &model_id, seq, Ok(Work::LoadWeights { path, optimizer }));
    }
    // A new training model straight from a checkpoint.
    let (Some(session), Some(seq)) = (r.session_id, r.model_seq_id) else {
        return Err(bad("`model_id` and `seq_id`, or `session_id` and `model_seq_id`, are required"));
    };
    let outcome = s
        .create_from_checkpoint(&session, seq, &path, optimizer)
        .map(|id| Outcome::Json(json!({"path": path, "model_id": id, "type": "load_weights"})));
    let model_id = outcome.as_ref().ok().and_then(|o| match o {
        Outcome::Json(j) => j["model_id"].as_str().map(String::from),
        _ => None,
    });
    Ok(future_reply(s.immediate(outcome.unwrap_or_else(Outcome::from)), model_id.as_deref()))
}

async fn create_sampling_session(State(s): S, body: Bytes) -> Reply {
    let r: req::CreateSampler = typed(&body)?;
    let Some(session) = r.session_id else {
        // xorl-client: make the saved adapter addressable by name for /generate.
        let path = r.model_path.ok_or_else(|| bad("`model_path` is required"))?;
        let name = s.register_lora_name(&path)?;
        return Ok(Json(json!({"success": true, "lora_name": name, "model_path": path})));
    };
    let id = s.create_sampler(&session, r.model_path, r.base_model)?;
    Ok(Json(json!({"type": "create_sampling_session", "sampling_session_id": id})))
}

async fn get_sampler(State(s): S, Path(id): Path<String>) -> Reply {
    let sampler = s.sampler(&id).map_err(|f| HttpError(StatusCode::NOT_FOUND, f.message))?;
    Ok(Json(json!({"sampler_id": id, "base_model": sampler.base_model, "model_path": sampler.model_path})))
}

/// Stop strings and token ids from either API's `stop`.
fn stop_of(stop: Option<StopIn>, tokens: Vec<u32>) -> Stop {
    let mut out = Stop { tokens, strings: Vec::new() };
    match stop {
        None => {}
        Some(StopIn::One(x)) => out.strings.push(x),
        Some(StopIn::Many(items)) => {
            for it in items {
                match it {
                    StopItem::Text(x) => out.strings.push(x),
                    StopItem::Token(t) => out.tokens.push(t),
                }
            }
        }
    }
    out
}

async fn asample(State(s): S, identity: Option<Extension<Identity>>, body: Bytes) -> Reply {
    let r: req::Sample = typed(&body)?;
    let (session, weights, dedup) = match &r.sampling_session_id {
        Some(id) => {
            let sampler = s.sampler(id)?;
            // Charged to the Tinker session that made the sampler, as its training is.
            let session = sampler.session.clone().unwrap_or_else(|| id.clone());
            (session, sampler.weights.clone(), r.seq_id.map(|q| (id.clone(), q)))
        }
        None => {
            s.check_base(r.base_model.as_deref().unwrap_or(""))?;
            ("base".to_string(), None, None)
        }
    };
    let prompt = r.prompt.tokens().map_err(bad)?;
    let unsupported = [
        ("topk_prompt_logprobs", r.topk_prompt_logprobs),
        ("topk_sample_logprobs", r.topk_sample_logprobs),
        ("prompt_alt_tokens_k", r.prompt_alt_tokens_k),
    ];
    if let Some((k, _)) = unsupported.iter().find(|(_, n)| n.unwrap_or(0) > 0) {
        return Err(bad(format!(
            "`{k}` is not supported yet (per-token logprobs of the sampled tokens are always returned)"
        )));
    }
    if r.target_prompt_logprobs.is_some_and(|t| !t.is_null()) {
        return Err(bad("`target_prompt_logprobs` is not supported yet"));
    }
    // Ranges are checked once, by the engine (`SamplingParams::validate`), for every API.
    let p = r.sampling_params.unwrap_or_default();
    let req = SampleRequest {
        session,
        key_client: identity.and_then(|i| i.0.key_client),
        dedup,
        weights,
        prompt,
        num_samples: r.num_samples.unwrap_or(1) as usize,
        max_tokens: p.max_tokens.map(|m| m as usize),
        temperature: p.temperature.unwrap_or(1.0),
        top_k: p.top_k.filter(|&k| k > 0).unwrap_or(0) as usize,
        top_p: p.top_p.unwrap_or(1.0),
        seed: p.seed,
        stop: stop_of(p.stop, Vec::new()),
        prompt_logprobs: r.prompt_logprobs.unwrap_or(false),
    };
    let (id, seq_ids) = s.sample(req)?;
    Ok(Json(json!({"request_id": id, "sample_sequence_ids": seq_ids})))
}

async fn retrieve_future(State(s): S, headers: HeaderMap, body: Bytes) -> Result<Response, HttpError> {
    let r: req::FutureRef = typed(&body)?;
    let id = r.request_id.as_str();
    match s.futures.poll(id, HOLD).await {
        Poll::Unknown => Err(HttpError(StatusCode::NOT_FOUND, format!("unknown request_id `{id}`"))),
        Poll::Pending => {
            Ok(Json(json!({"type": "try_again", "request_id": id, "queue_state": "active"})).into_response())
        }
        Poll::Done(outcome) => {
            if is_proto(&headers, header::ACCEPT) {
                if let Some(bytes) = outcome.proto() {
                    return Ok(([(header::CONTENT_TYPE, "application/x-protobuf")], bytes).into_response());
                }
            }
            Ok(Json(outcome.json()).into_response())
        }
    }
}

async fn list_checkpoints(State(s): S, Path(run): Path<String>) -> Reply {
    Ok(Json(s.list_checkpoints(&run)?))
}

async fn delete_checkpoint(
    State(s): S,
    Path((run, checkpoint)): Path<(String, String)>,
) -> Result<StatusCode, HttpError> {
    s.delete_checkpoint(&run, &checkpoint)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `{"path": "tinker://...", "name": NAME, "overwrite": false}` -> `export_dir/NAME`.
async fn export(State(s): S, body: Bytes) -> Reply {
    let r: req::Export = typed(&body)?;
    if r.out_dir.is_some() {
        return Err(bad(
            "`out_dir` is not accepted: exports go under the server's --export-dir; give the folder's `name`",
        ));
    }
    let overwrite = r.overwrite.unwrap_or(false);
    let out = tokio::task::spawn_blocking(move || s.export(&r.path, &r.name, overwrite))
        .await
        .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(json!({"out_dir": out.display().to_string()})))
}

async fn unload_model(State(s): S, body: Bytes) -> Reply {
    let r: req::ModelRef = typed(&body)?;
    s.unload(&r.model_id)?;
    Ok(Json(json!({"model_id": r.model_id, "type": "unload_model"})))
}

async fn weights_info(State(s): S, body: Bytes) -> Reply {
    let r: req::WeightsInfo = typed(&body)?;
    Ok(Json(s.weights_info(&r.tinker_path)?))
}

/// SGLang's `/generate` (what xorl-client samples with): `input_ids` or `text`, `sampling_params`
/// {max_new_tokens, temperature, top_p, top_k, n, stop, seed}, `lora_path` naming saved sampler
/// weights. One result object for n = 1, a list otherwise.
async fn generate(State(s): S, identity: Option<Extension<Identity>>, body: Bytes) -> Result<Json<Value>, HttpError> {
    let r: req::Generate = typed(&body)?;
    let prompt: Vec<u32> = match (r.input_ids, r.text) {
        (Some(ids), _) => ids,
        (None, Some(text)) => {
            s.tokenizer.encode(text, false).map_err(|e| bad(format!("tokenizing: {e}")))?.get_ids().to_vec()
        }
        (None, None) => return Err(bad("`input_ids` or `text` is required")),
    };
    let weights = match r.lora_path.filter(|p| !p.is_empty()) {
        Some(name) => Some(s.lora_by_name(&name)?),
        None => None,
    };
    let p = r.sampling_params;
    let req = SampleRequest {
        session: "generate".into(),
        key_client: identity.and_then(|i| i.0.key_client),
        dedup: None,
        weights,
        prompt: prompt.clone(),
        num_samples: p.n.unwrap_or(1) as usize,
        max_tokens: p.max_new_tokens.map(|m| m as usize),
        temperature: p.temperature.unwrap_or(1.0),
        top_k: p.top_k.filter(|&k| k > 0).unwrap_or(0) as usize,
        top_p: p.top_p.unwrap_or(1.0),
        seed: p.seed,
        stop: stop_of(p.stop, p.stop_token_ids.unwrap_or_default()),
        prompt_logprobs: false,
    };
    let (id, _) = s.sample(req)?;
    let outcome = loop {
        match s.futures.poll(&id, HOLD).await {
            Poll::Done(o) => break o,
            Poll::Pending => continue,
            Poll::Unknown => return Err(HttpError(StatusCode::INTERNAL_SERVER_ERROR, "the sample was lost".into())),
        }
    };
    let r = match outcome.as_ref() {
        Outcome::Sample(r) => r,
        Outcome::Failed { error, .. } => return Err(HttpError(StatusCode::BAD_REQUEST, error.clone())),
        _ => return Err(HttpError(StatusCode::INTERNAL_SERVER_ERROR, "unexpected result".into())),
    };
    let items: Vec<Value> = r
        .sequences
        .iter()
        .map(|q| {
            json!({
                "text": s.tokenizer.decode(&q.tokens, false).unwrap_or_default(),
                "output_ids": q.tokens,
                "meta_info": {
                    "finish_reason": if q.stopped { "stop" } else { "length" },
                    "prompt_tokens": prompt.len(),
                    "completion_tokens": q.tokens.len(),
                    "output_token_logprobs": q.logprobs.iter().zip(&q.tokens).map(|(lp, t)| json!([lp, t, Value::Null])).collect::<Vec<_>>(),
                },
            })
        })
        .collect();
    Ok(Json(if items.len() == 1 { items.into_iter().next().expect("one") } else { Value::Array(items) }))
}
