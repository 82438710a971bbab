//! The worker surface a router in front of a fleet uses (the SGLang Model Gateway, `smg`, and
//! SGLang-style RL drivers): what the server is and serves (`/server_info`, `/model_info`), how
//! loaded it is (`/get_load` in SGLang's form, `/v1/loads` in the gateway's own), and the
//! operator's controls (`/flush_cache`, `/pause_generation`, `/continue_generation`,
//! `/update_weights_from_disk`), which the gateway's RL mode fans out to every worker.
//!
//! A server with several models is one worker: loads add up, controls apply to every model,
//! and the first model describes the worker.
use crate::error::ApiError;
use crate::{AppState, Server, Shared};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tandem_engine::online::Version;
use tandem_engine::Control;
use tandem_runtime::speculative::{EagleConfig, EagleWeights};

/// The routes that change what a worker does: with keys on, only admin keys reach them.
pub fn is_control(path: &str) -> bool {
    matches!(path, "/flush_cache" | "/pause_generation" | "/continue_generation" | "/update_weights_from_disk")
}

/// Prometheus text from a part of the server outside this crate (the fleet's broker clients).
pub type MetricsText = Box<dyn Fn() -> String + Send + Sync>;

/// What the operator allows the worker controls to do, and what they changed.
#[derive(Default)]
pub struct WorkerControls {
    /// The only folder `/update_weights_from_disk` reads (None: it reads nothing).
    pub weights_dir: Option<PathBuf>,
    /// The label the last weight update gave (SGLang's `weight_version`), "0" at start.
    weight_version: Mutex<Option<String>>,
    /// Appended to /metrics.
    pub metrics: Vec<MetricsText>,
}

impl WorkerControls {
    pub fn new(weights_dir: Option<PathBuf>, metrics: Vec<MetricsText>) -> Self {
        WorkerControls { weights_dir, weight_version: Mutex::new(None), metrics }
    }

    pub fn weight_version(&self) -> String {
        self.weight_version.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(|| "0".into())
    }
}

/// The drafter version the first model serves (0: the one it started with; none without online
/// hooks).
fn drafter_version(state: &AppState) -> Option<u64> {
    state.online.as_ref().map(|o| o.exchange.weights.serving_version.load(Ordering::Relaxed))
}

pub async fn server_info(State(server): Shared) -> Json<Value> {
    let m = server.first();
    let c = m.engine.config();
    Json(json!({
        "model_id": m.model_name,
        "model_path": m.model_name,
        "served_model_name": m.model_name,
        "served_models": server.served_names(),
        "engine": "tandem",
        "version": env!("CARGO_PKG_VERSION"),
        "tp_size": 1, "dp_size": 1, "pp_size": 1,
        "context_length": c.max_seq_len,
        "max_total_tokens": c.kv_tokens.unwrap_or(c.max_batch * c.max_seq_len),
        "max_running_requests": c.max_batch,
        "is_embedding": false,
        "weight_version": server.controls.weight_version(),
        "drafter_version": drafter_version(m),
        "drafter": m.engine.spec_stats().drafter,
        "paused": m.engine.is_paused(),
        "scheduling_policy": m.engine.policy_name(),
    }))
}

pub async fn model_info(State(server): Shared) -> Json<Value> {
    let m = server.first();
    Json(json!({
        "model_path": m.model_name,
        "tokenizer_path": m.model_name,
        "is_generation": true,
        "has_image_understanding": false,
        "has_audio_understanding": false,
        "weight_version": server.controls.weight_version(),
        "drafter_version": drafter_version(m),
    }))
}

/// Requests, waiting requests and KV tokens held, over every model.
struct Load {
    running: usize,
    waiting: usize,
    used_tokens: usize,
    total_tokens: usize,
    max_running: usize,
    hit_rate: f64,
}

fn load(server: &Server) -> Load {
    let mut l = Load { running: 0, waiting: 0, used_tokens: 0, total_tokens: 0, max_running: 0, hit_rate: 0.0 };
    let (mut queries, mut hits) = (0u64, 0u64);
    for m in &server.models {
        let kv = m.engine.kv_usage();
        l.running += m.engine.running();
        l.waiting += m.engine.waiting();
        let c = m.engine.config();
        l.used_tokens += kv.held * tandem_models::BLOCK;
        // Before the first step the pool's size is not published yet: the configured one.
        l.total_tokens += match kv.blocks {
            0 => c.kv_tokens.unwrap_or(c.max_batch * c.max_seq_len),
            b => b * tandem_models::BLOCK,
        };
        l.max_running += c.max_batch;
        (queries, hits) = (queries + kv.prefix_queries, hits + kv.prefix_hits);
    }
    l.hit_rate = if queries > 0 { hits as f64 / queries as f64 } else { 0.0 };
    l
}

/// SGLang's `/get_load`: one entry per data-parallel rank (tandem has one).
pub async fn get_load(State(server): Shared) -> Json<Value> {
    let l = load(&server);
    Json(json!([{"dp_rank": 0, "num_reqs": l.running + l.waiting, "num_waiting_reqs": l.waiting,
                 "num_tokens": l.used_tokens}]))
}

/// The gateway's own load report (`WorkerLoadResponse`), which its load-aware policies read.
pub async fn loads(State(server): Shared) -> Json<Value> {
    let l = load(&server);
    let usage = if l.total_tokens > 0 { l.used_tokens as f64 / l.total_tokens as f64 } else { 0.0 };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Json(json!({
        "timestamp": now.to_string(),
        "dp_rank_count": 1,
        "loads": [{
            "dp_rank": 0,
            "num_running_reqs": l.running,
            "num_waiting_reqs": l.waiting,
            "num_waiting_uncached_tokens": 0,
            "num_total_reqs": l.running + l.waiting,
            "num_used_tokens": l.used_tokens,
            "max_total_num_tokens": l.total_tokens,
            "token_usage": usage,
            "gen_throughput": 0.0,
            "cache_hit_rate": l.hit_rate,
            "utilization": if l.max_running > 0 { l.running as f64 / l.max_running as f64 } else { 0.0 },
            "max_running_requests": l.max_running,
        }],
    }))
}

/// Runs `op` on every model's engine; the answers, in model order.
async fn control_all(server: &Server, op: Control) -> Result<Vec<usize>, ApiError> {
    let engines: Vec<_> = server.models.iter().map(|m| m.engine.clone()).collect();
    tokio::task::spawn_blocking(move || engines.iter().map(|e| e.control(op)).collect::<Option<Vec<usize>>>())
        .await
        .map_err(|e| ApiError::internal(format!("control task failed: {e}")))?
        .ok_or_else(|| ApiError::unavailable("an engine has stopped", 1))
}

pub async fn flush_cache(State(server): Shared) -> Result<Json<Value>, ApiError> {
    let freed: usize = control_all(&server, Control::FlushCache).await?.iter().sum();
    Ok(Json(json!({"success": true, "message": "Cache flushed.", "freed_blocks": freed})))
}

#[derive(Deserialize, Default)]
struct PauseRequest {
    mode: Option<String>,
}

/// Pauses generation in place: running sequences keep their KV cache and continue where they
/// were after `/continue_generation`; new requests queue. (SGLang's `abort` and `retract` modes,
/// which end or recompute running requests, are refused: a weight update here never needs them,
/// as weights change between steps.)
pub async fn pause_generation(
    State(server): Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: PauseRequest = optional_json(body)?;
    match req.mode.as_deref() {
        None | Some("in_place") => {}
        Some(other) => {
            return Err(ApiError::bad_request(
                format!(
                "pause mode `{other}` is not supported; tandem pauses `in_place` (running requests keep their place)"
            ),
                Some("mode"),
            ))
        }
    }
    control_all(&server, Control::Pause).await?;
    Ok(Json(json!({"success": true, "message": "Generation paused."})))
}

pub async fn continue_generation(State(server): Shared) -> Result<Json<Value>, ApiError> {
    control_all(&server, Control::Resume).await?;
    Ok(Json(json!({"success": true, "message": "Generation continued."})))
}

#[derive(Deserialize)]
struct UpdateFromDisk {
    /// A folder under the server's `--weights-dir`, absolute or relative to it.
    model_path: String,
    /// The label the fleet gives this version (reported by `/server_info`).
    weight_version: Option<String>,
    /// Update the EAGLE drafter (tandem's only weights updated from disk: a policy's weights
    /// are trained and sampled through the training API). SGLang's other fields
    /// (`abort_all_requests`, `load_format`, ...) are accepted and mean nothing here: weights
    /// change between engine steps, never mid-step.
    #[serde(default)]
    update_draft_model: bool,
}

/// Loads a drafter version from disk and serves it from the next step on (the engine's rollback
/// rule still judges it). The path must lie under the operator's `--weights-dir`.
pub async fn update_weights_from_disk(
    State(server): Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: UpdateFromDisk = required_json(body)?;
    if !req.update_draft_model {
        return Err(ApiError::bad_request(
            "tandem updates the drafter from disk (`update_draft_model: true`); a policy's weights are trained and \
             sampled through the training API (/api/v1)",
            Some("update_draft_model"),
        ));
    }
    let dir = resolve_under(server.controls.weights_dir.as_deref(), &req.model_path)?;
    let state = server.first().clone();
    let Some(online) = state.online.clone() else {
        return Err(ApiError::bad_request(
            "this server serves no updatable drafter: start it with --spec eagle and --weights-dir (or --spec-train online)",
            Some("update_draft_model"),
        ));
    };
    let weights = tokio::task::spawn_blocking(move || load_drafter(&dir))
        .await
        .map_err(|e| ApiError::internal(format!("loading task failed: {e}")))??;
    online.exchange.check_fits(&weights).map_err(|e| ApiError::bad_request(e, Some("model_path")))?;
    let slot = &online.exchange.weights;
    let number = slot.published.load(Ordering::Relaxed).max(slot.serving_version.load(Ordering::Relaxed)) + 1;
    slot.publish(Version { number, weights: Arc::new(weights) });
    if let Some(label) = &req.weight_version {
        *server.controls.weight_version.lock().unwrap_or_else(|e| e.into_inner()) = Some(label.clone());
    }
    tracing::info!(path = %req.model_path, drafter_version = number, "drafter weights loaded from disk");
    Ok(Json(
        json!({"success": true, "message": format!("drafter version {number} offered; it serves from the next step"),
                   "num_paused_requests": 0, "drafter_version": number}),
    ))
}

fn load_drafter(dir: &Path) -> Result<EagleWeights, ApiError> {
    let bad =
        |e: tandem_models::ModelError| ApiError::bad_request(format!("{}: {e}", dir.display()), Some("model_path"));
    let config = EagleConfig::load(dir).map_err(bad)?;
    EagleWeights::load(dir, &config, &tandem_models::Device::Cpu).map_err(bad)
}

/// `path` (absolute, or relative to `root`) as a folder inside `root`, symbolic links resolved:
/// a client never reaches files outside the folder the operator gave.
fn resolve_under(root: Option<&Path>, path: &str) -> Result<PathBuf, ApiError> {
    let Some(root) = root else {
        return Err(ApiError::forbidden("this server reads no weights from disk: start it with --weights-dir DIR"));
    };
    let root = root.canonicalize().map_err(|e| ApiError::internal(format!("--weights-dir {}: {e}", root.display())))?;
    let candidate = root.join(path);
    let resolved = candidate.canonicalize().map_err(|_| {
        ApiError::bad_request(format!("`{path}` does not exist under the weights folder"), Some("model_path"))
    })?;
    if !resolved.starts_with(&root) {
        return Err(ApiError::forbidden(format!("`{path}` is outside the weights folder")));
    }
    Ok(resolved)
}

fn optional_json<T: serde::de::DeserializeOwned + Default>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| ApiError::with_status(r.status(), r.body_text()))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid body: {e}"), None))
}

fn required_json<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| ApiError::with_status(r.status(), r.body_text()))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid body: {e}"), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_paths_stay_inside_the_folder() {
        let root = std::env::temp_dir().join(format!("tandem-weights-{}", std::process::id()));
        std::fs::create_dir_all(root.join("v1")).unwrap();
        assert!(resolve_under(Some(&root), "v1").is_ok());
        assert!(resolve_under(Some(&root), &root.join("v1").to_string_lossy()).is_ok());
        assert!(resolve_under(Some(&root), "../").is_err());
        assert!(resolve_under(Some(&root), "/etc").is_err());
        assert!(resolve_under(Some(&root), "missing").is_err());
        assert!(resolve_under(None, "v1").is_err());
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        assert!(resolve_under(Some(&root), "out").is_err(), "a link out of the folder is refused");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
