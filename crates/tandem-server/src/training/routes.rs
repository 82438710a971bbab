//! HTTP routes of the training API: the Tinker SDK's (JSON, with protobuf for forward_backward and
//! for forward_backward and sample results) and the JSON forms xorl-client sends.
//!
//! Over 600 lines because each Tinker and xorl route still decodes its JSON by hand (typed
//! request structs, as the OpenAI routes have, would shrink it: an open item of the engine-shape
//! issue).
use super::futures::Poll;
use super::proto;
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

fn str_field<'a>(v: &'a Value, k: &str) -> Result<&'a str, HttpError> {
    v.get(k).and_then(Value::as_str).ok_or_else(|| bad(format!("`{k}` (a string) is required")))
}

fn int_field(v: &Value, k: &str) -> Result<i64, HttpError> {
    v.get(k).and_then(Value::as_i64).ok_or_else(|| bad(format!("`{k}` (an integer) is required")))
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
    let v = body_json(&body)?;
    s.heartbeat(str_field(&v, "session_id")?)?;
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
    let v = body_json(&body)?;
    // Tinker names models by session and sequence; xorl-client by a name of its choosing.
    let session = v.get("session_id").and_then(Value::as_str);
    let seq = match session {
        Some(_) => int_field(&v, "model_seq_id")?,
        None => 0,
    };
    let outcome = (|| -> Result<Outcome, Failure> {
        s.check_base(v.get("base_model").and_then(Value::as_str).unwrap_or(""))?;
        if let Some(t) = v.pointer("/optimizer_config/type").and_then(Value::as_str) {
            if t != "adamw" && t != "adam" {
                return Err(Failure::user(format!("optimizer `{t}` is not supported (adamw is)")));
            }
        }
        let (mode, seed) = match v.get("lora_config").filter(|c| !c.is_null()) {
            None => (Mode::Full, 0),
            Some(c) => {
                let rank = c
                    .get("rank")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| Failure::user("lora_config.rank is required"))?;
                let flag = |k: &str| c.get(k).and_then(Value::as_bool).unwrap_or(true);
                let alpha = c.get("alpha").and_then(Value::as_f64).unwrap_or(32.0);
                if c.get("dropout").and_then(Value::as_f64).is_some_and(|d| d != 0.0) {
                    return Err(Failure::user("LoRA dropout is not supported (use 0)"));
                }
                let targets =
                    LoraTargets { attn: flag("train_attn"), mlp: flag("train_mlp"), unembed: flag("train_unembed") };
                (
                    Mode::Lora(LoraSpec { rank: rank as usize, alpha, targets }),
                    c.get("seed").and_then(Value::as_u64).unwrap_or(0),
                )
            }
        };
        let id = match session {
            Some(session) => s.create_model(session, seq, mode, seed)?,
            None => s.create_named_model(v.get("model_id").and_then(Value::as_str).unwrap_or("default"), mode, seed)?,
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
    let v = body_json(&body)?;
    let model = s.model(str_field(&v, "model_id")?)?;
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

/// Token ids of a Tinker JSON model input (`{"chunks": [{"type": "encoded_text", "tokens"}]}`)
/// or an xorl one (`{"input_ids": [...]}`).
fn json_tokens(v: &Value) -> Result<Vec<u32>, String> {
    let ids = |a: &Value| -> Result<Vec<u32>, String> {
        a.as_array()
            .ok_or("tokens must be an array")?
            .iter()
            .map(|t| {
                t.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
                    .ok_or_else(|| format!("bad token id {t}"))
            })
            .collect()
    };
    if let Some(a) = v.get("input_ids") {
        return ids(a);
    }
    let chunks = v.get("chunks").and_then(Value::as_array).ok_or("model_input needs `chunks` or `input_ids`")?;
    let mut out = Vec::new();
    for c in chunks {
        match c.get("type").and_then(Value::as_str).unwrap_or("encoded_text") {
            "encoded_text" => out.extend(ids(c.get("tokens").ok_or("an encoded_text chunk needs `tokens`")?)?),
            other => return Err(format!("`{other}` chunks are not supported: tandem serves text models")),
        }
    }
    Ok(out)
}

/// A JSON tensor `{"data": [...], "dtype", "shape"}` (or a bare array) as f64 values.
fn json_tensor(v: &Value) -> Result<Vec<f64>, String> {
    let data = v.get("data").unwrap_or(v);
    fn flat(v: &Value, out: &mut Vec<f64>) -> Result<(), String> {
        match v {
            Value::Array(a) => a.iter().try_for_each(|x| flat(x, out)),
            Value::Number(n) => {
                out.push(n.as_f64().ok_or("bad number")?);
                Ok(())
            }
            other => Err(format!("tensor values must be numbers, got {other}")),
        }
    }
    let mut out = Vec::new();
    flat(data, &mut out)?;
    Ok(out)
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

fn loss_config(v: Option<&Value>) -> Result<BTreeMap<String, ConfigValue>, String> {
    let mut out = BTreeMap::new();
    if let Some(obj) = v.and_then(Value::as_object) {
        for (k, x) in obj {
            let c = match x {
                Value::Number(n) => ConfigValue::Number(n.as_f64().unwrap_or(f64::NAN)),
                Value::String(s) => ConfigValue::Text(s.clone()),
                other => return Err(format!("loss_fn_config `{k}`: unsupported value {other}")),
            };
            out.insert(k.clone(), c);
        }
    }
    Ok(out)
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

fn decode_json(v: &Value, forward_only: bool) -> Result<FbRequest, HttpError> {
    let model_id = str_field(v, "model_id")?.to_string();
    let seq_id = int_field(v, "seq_id")?;
    let input = v.get("forward_backward_input").or_else(|| v.get("forward_input")).unwrap_or(v);
    let work = (|| -> Result<Work, String> {
        let loss_name = input.get("loss_fn").and_then(Value::as_str).unwrap_or("cross_entropy");
        let config = loss_config(input.get("loss_fn_config").or_else(|| input.get("loss_fn_params")))?;
        let loss = LossFn::parse(loss_name, &config)?;
        let items = input.get("data").and_then(Value::as_array).ok_or("`data` (an array of datums) is required")?;
        let mut data = Vec::new();
        for (i, d) in items.iter().enumerate() {
            let tokens =
                json_tokens(d.get("model_input").ok_or_else(|| format!("datum {i}: `model_input` is required"))?)
                    .map_err(|e| format!("datum {i}: {e}"))?;
            let mut inputs = BTreeMap::new();
            if let Some(obj) = d.get("loss_fn_inputs").and_then(Value::as_object) {
                for (k, t) in obj {
                    inputs.insert(k.clone(), json_tensor(t).map_err(|e| format!("datum {i}: `{k}`: {e}"))?);
                }
            }
            data.push(datum(i, tokens, inputs)?);
        }
        let forward_only = forward_only || v.get("forward_only").and_then(Value::as_bool).unwrap_or(false);
        Ok(Work::ForwardBackward { data, loss, forward_only })
    })();
    Ok(FbRequest { model_id, seq_id, work })
}

fn is_proto(headers: &HeaderMap, key: header::HeaderName) -> bool {
    headers.get(key).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/x-protobuf"))
}

/// Queues a training request; bad input becomes a failed future (category user), so the caller
/// sees the error where it waits for the result, and serving is never disturbed.
fn submit(s: &TrainingService, model_id: &str, seq: i64, work: Result<Work, String>) -> Reply {
    let model = match s.model(model_id) {
        Ok(m) => m,
        Err(f) => return Ok(future_reply(s.immediate(f.into()), Some(model_id))),
    };
    let id = match work {
        Ok(w) => s.submit(&model, seq, w)?,
        // The failure still takes its turn, so later seq_ids are not held up.
        Err(e) => s.submit(&model, seq, Work::Fail(e))?,
    };
    Ok(future_reply(id, Some(model_id)))
}

async fn forward_backward(State(s): S, headers: HeaderMap, body: Bytes) -> Reply {
    if headers.get(header::CONTENT_ENCODING).is_some() {
        return Err(HttpError(StatusCode::UNSUPPORTED_MEDIA_TYPE, "compressed bodies are not supported".into()));
    }
    let r = if is_proto(&headers, header::CONTENT_TYPE) {
        decode_proto(&body)?
    } else {
        decode_json(&body_json(&body)?, false)?
    };
    submit(&s, &r.model_id, r.seq_id, r.work)
}

async fn forward(State(s): S, body: Bytes) -> Reply {
    let r = decode_json(&body_json(&body)?, true)?;
    submit(&s, &r.model_id, r.seq_id, r.work)
}

async fn optim_step(State(s): S, body: Bytes) -> Reply {
    let v = body_json(&body)?;
    let model_id = str_field(&v, "model_id")?;
    let p = v.get("adam_params").or_else(|| v.get("optim_params")).cloned().unwrap_or(json!({}));
    let d = AdamParams::default();
    // A field present with the wrong type is the caller's error, never replaced by a default.
    let f = |k: &str, default: f64| -> Result<f64, HttpError> {
        match p.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| bad(format!("adam_params.{k} must be a number, got {v}"))),
        }
    };
    let lr = if p.get("learning_rate").is_some() { "learning_rate" } else { "lr" };
    let params = AdamParams {
        learning_rate: f(lr, d.learning_rate)?,
        beta1: f("beta1", d.beta1)?,
        beta2: f("beta2", d.beta2)?,
        eps: f("eps", d.eps)?,
        weight_decay: f("weight_decay", d.weight_decay)?,
        grad_clip_norm: f("grad_clip_norm", d.grad_clip_norm)?,
    };
    submit(&s, model_id, int_field(&v, "seq_id")?, Ok(Work::OptimStep(params)))
}

async fn save_weights(State(s): S, body: Bytes) -> Reply {
    let v = body_json(&body)?;
    let model_id = str_field(&v, "model_id")?;
    let name = v.get("path").or_else(|| v.get("name")).and_then(Value::as_str).map(String::from);
    let name = name.unwrap_or_else(|| format!("step-{}", v.get("seq_id").and_then(Value::as_i64).unwrap_or(0)));
    submit(&s, model_id, int_field(&v, "seq_id")?, Ok(Work::SaveWeights { name }))
}

async fn save_weights_for_sampler(State(s): S, body: Bytes) -> Reply {
    let v = body_json(&body)?;
    let model_id = str_field(&v, "model_id")?;
    let name = v.get("path").or_else(|| v.get("name")).and_then(Value::as_str).map(String::from);
    let session = model_id.split(':').next().map(String::from);
    submit(&s, model_id, int_field(&v, "seq_id")?, Ok(Work::SaveForSampler { name, session }))
}

async fn load_weights(State(s): S, body: Bytes) -> Reply {
    let v = body_json(&body)?;
    let path = str_field(&v, "path")?.to_string();
    let optimizer = v.get("optimizer").or_else(|| v.get("load_optimizer")).and_then(Value::as_bool).unwrap_or(false);
    if let Some(model_id) = v.get("model_id").and_then(Value::as_str) {
        return submit(&s, model_id, int_field(&v, "seq_id")?, Ok(Work::LoadWeights { path, optimizer }));
    }
    // A new training model straight from a checkpoint.
    let session = str_field(&v, "session_id")?;
    let seq = int_field(&v, "model_seq_id")?;
    let outcome = s
        .create_from_checkpoint(session, seq, &path, optimizer)
        .map(|id| Outcome::Json(json!({"path": path, "model_id": id, "type": "load_weights"})));
    let model_id = outcome.as_ref().ok().and_then(|o| match o {
        Outcome::Json(j) => j["model_id"].as_str().map(String::from),
        _ => None,
    });
    Ok(future_reply(s.immediate(outcome.unwrap_or_else(Outcome::from)), model_id.as_deref()))
}

async fn create_sampling_session(State(s): S, body: Bytes) -> Reply {
    let v = body_json(&body)?;
    let Some(session) = v.get("session_id").and_then(Value::as_str) else {
        // xorl-client: make the saved adapter addressable by name for /generate.
        let path = str_field(&v, "model_path")?;
        let name = s.register_lora_name(path)?;
        return Ok(Json(json!({"success": true, "lora_name": name, "model_path": path})));
    };
    let path = v.get("model_path").and_then(Value::as_str).map(String::from);
    let base = v.get("base_model").and_then(Value::as_str).map(String::from);
    let id = s.create_sampler(session, path, base)?;
    Ok(Json(json!({"type": "create_sampling_session", "sampling_session_id": id})))
}

async fn get_sampler(State(s): S, Path(id): Path<String>) -> Reply {
    let sampler = s.sampler(&id).map_err(|f| HttpError(StatusCode::NOT_FOUND, f.message))?;
    Ok(Json(json!({"sampler_id": id, "base_model": sampler.base_model, "model_path": sampler.model_path})))
}

/// The Tinker SDK's `SamplingParams` (fields it may add later are ignored).
#[derive(serde::Deserialize, Default)]
struct SamplingIn {
    max_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<StopIn>,
}

/// `stop`: one string, or a list of strings and token ids.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum StopIn {
    One(String),
    Many(Vec<StopItem>),
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum StopItem {
    Text(String),
    Token(u32),
}

async fn asample(State(s): S, identity: Option<Extension<Identity>>, body: Bytes) -> Reply {
    let v = body_json(&body)?;
    let (session, weights, dedup) = match v.get("sampling_session_id").and_then(Value::as_str) {
        Some(id) => {
            let sampler = s.sampler(id)?;
            let seq = v.get("seq_id").and_then(Value::as_i64);
            (id.to_string(), sampler.weights.clone(), seq.map(|q| (id.to_string(), q)))
        }
        None => {
            s.check_base(v.get("base_model").and_then(Value::as_str).unwrap_or(""))?;
            ("base".to_string(), None, None)
        }
    };
    let prompt = json_tokens(v.get("prompt").ok_or_else(|| bad("`prompt` is required"))?).map_err(bad)?;
    for k in ["topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"] {
        if v.get(k).and_then(Value::as_u64).unwrap_or(0) > 0 {
            return Err(bad(format!(
                "`{k}` is not supported yet (per-token logprobs of the sampled tokens are always returned)"
            )));
        }
    }
    if v.get("target_prompt_logprobs").is_some_and(|t| !t.is_null()) {
        return Err(bad("`target_prompt_logprobs` is not supported yet"));
    }
    // Typed: a wrong type is a 400 naming the field (it used to fall back to the default silently).
    // Ranges are checked once, by the engine (`SamplingParams::validate`), for every API.
    let p: SamplingIn = match v.get("sampling_params") {
        None | Some(Value::Null) => SamplingIn::default(),
        Some(p) => serde_path_to_error::deserialize(p)
            .map_err(|e| bad(format!("`sampling_params.{}`: {}", e.path(), e.inner())))?,
    };
    let mut stop = Stop::default();
    match p.stop {
        None => {}
        Some(StopIn::One(x)) => stop.strings.push(x),
        Some(StopIn::Many(items)) => {
            for it in items {
                match it {
                    StopItem::Text(x) => stop.strings.push(x),
                    StopItem::Token(t) => stop.tokens.push(t),
                }
            }
        }
    }
    let req = SampleRequest {
        session,
        key_client: identity.and_then(|i| i.0.key_client),
        dedup,
        weights,
        prompt,
        num_samples: v.get("num_samples").and_then(Value::as_u64).unwrap_or(1) as usize,
        max_tokens: p.max_tokens.map(|m| m as usize),
        temperature: p.temperature.unwrap_or(1.0),
        top_k: p.top_k.filter(|&k| k > 0).unwrap_or(0) as usize,
        top_p: p.top_p.unwrap_or(1.0),
        seed: p.seed,
        stop,
        prompt_logprobs: v.get("prompt_logprobs").and_then(Value::as_bool).unwrap_or(false),
    };
    let (id, seq_ids) = s.sample(req)?;
    Ok(Json(json!({"request_id": id, "sample_sequence_ids": seq_ids})))
}

async fn retrieve_future(State(s): S, headers: HeaderMap, body: Bytes) -> Result<Response, HttpError> {
    let v = body_json(&body)?;
    let id = str_field(&v, "request_id")?;
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
    let v = body_json(&body)?;
    if v.get("out_dir").is_some() {
        return Err(HttpError(
            StatusCode::BAD_REQUEST,
            "`out_dir` is not accepted: exports go under the server's --export-dir; give the folder's `name`".into(),
        ));
    }
    let path = str_field(&v, "path")?.to_string();
    let name = str_field(&v, "name")?.to_string();
    let overwrite = match v.get("overwrite") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(HttpError(StatusCode::BAD_REQUEST, "`overwrite` must be true or false".into())),
    };
    let out = tokio::task::spawn_blocking(move || s.export(&path, &name, overwrite))
        .await
        .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(json!({"out_dir": out.display().to_string()})))
}

async fn unload_model(State(s): S, body: Bytes) -> Reply {
    let v = body_json(&body)?;
    let id = str_field(&v, "model_id")?;
    s.unload(id)?;
    Ok(Json(json!({"model_id": id, "type": "unload_model"})))
}

async fn weights_info(State(s): S, body: Bytes) -> Reply {
    let v = body_json(&body)?;
    let path = v.get("tinker_path").or_else(|| v.get("path")).or_else(|| v.get("model_path"));
    let path = path.and_then(Value::as_str).ok_or_else(|| bad("`tinker_path` (a string) is required"))?;
    Ok(Json(s.weights_info(path)?))
}

/// SGLang's `/generate` (what xorl-client samples with): `input_ids` or `text`, `sampling_params`
/// {max_new_tokens, temperature, top_p, top_k, n, stop, seed}, `lora_path` naming saved sampler
/// weights. One result object for n = 1, a list otherwise.
async fn generate(State(s): S, identity: Option<Extension<Identity>>, body: Bytes) -> Result<Json<Value>, HttpError> {
    let v = body_json(&body)?;
    let prompt: Vec<u32> = match (v.get("input_ids"), v.get("text").and_then(Value::as_str)) {
        (Some(ids), _) => json_tokens(&json!({"input_ids": ids})).map_err(bad)?,
        (None, Some(text)) => {
            s.tokenizer.encode(text, false).map_err(|e| bad(format!("tokenizing: {e}")))?.get_ids().to_vec()
        }
        (None, None) => return Err(bad("`input_ids` or `text` is required")),
    };
    let weights = match v.get("lora_path").and_then(Value::as_str).filter(|p| !p.is_empty()) {
        Some(name) => Some(s.lora_by_name(name)?),
        None => None,
    };
    let p = v.get("sampling_params").cloned().unwrap_or(json!({}));
    let mut stop = Stop::default();
    if let Some(items) = p.get("stop").and_then(Value::as_array) {
        stop.strings = items.iter().filter_map(Value::as_str).map(String::from).collect();
    } else if let Some(x) = p.get("stop").and_then(Value::as_str) {
        stop.strings.push(x.to_string());
    }
    if let Some(items) = p.get("stop_token_ids").and_then(Value::as_array) {
        stop.tokens = items.iter().filter_map(Value::as_u64).map(|t| t as u32).collect();
    }
    let n = p.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
    let req = SampleRequest {
        session: "generate".into(),
        key_client: identity.and_then(|i| i.0.key_client),
        dedup: None,
        weights,
        prompt: prompt.clone(),
        num_samples: n,
        max_tokens: p.get("max_new_tokens").and_then(Value::as_u64).map(|m| m as usize),
        temperature: p.get("temperature").and_then(Value::as_f64).unwrap_or(1.0) as f32,
        top_k: p.get("top_k").and_then(Value::as_i64).filter(|&k| k > 0).unwrap_or(0) as usize,
        top_p: p.get("top_p").and_then(Value::as_f64).unwrap_or(1.0) as f32,
        seed: p.get("seed").or_else(|| p.get("sampling_seed")).and_then(Value::as_u64),
        stop,
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
