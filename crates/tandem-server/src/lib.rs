//! tandem-server: the OpenAI-compatible HTTP API over the engine (axum + tokio).
mod api;
pub mod auth;
mod choice;
mod error;
mod metrics;
mod routes;
mod stop;
pub mod training;

pub use error::ApiError;
pub use metrics::Metrics;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tandem_engine::online::OnlineHooks;
use tandem_engine::{Engine, EngineConfig, EngineHandle, SchedulingPolicy, ServedDrafter};
use tandem_models::{LoadedModel, Tokenizer};
use tandem_runtime::ChatTemplate;

/// Largest request body accepted (a long prompt fits; a runaway upload is refused with 413).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub model_name: String,
    pub stop_token_ids: Vec<u32>,
    pub metrics: Arc<Metrics>,
    /// Bytes of one KV block (`BLOCK` tokens over every layer's keys and values).
    pub kv_bytes_per_block: usize,
    pub next_id: AtomicU64,
    pub created: u64,
    /// Online drafter training, when on (for /metrics).
    pub online: Option<OnlineHooks>,
    /// The RL training service (Tinker API), when on.
    pub training: Option<Arc<training::TrainingService>>,
}

impl AppState {
    /// Starts the engine thread for `loaded` and wraps what the routes need.
    /// `policy` orders waiting requests (FCFS or fair). With a `drafter`, decoding is speculative (`config.spec_k` tokens per step at most).
    pub fn start(
        loaded: LoadedModel,
        config: EngineConfig,
        policy: Box<dyn SchedulingPolicy>,
        drafter: Option<ServedDrafter>,
        online: Option<OnlineHooks>,
    ) -> Result<(Arc<AppState>, std::thread::JoinHandle<()>), String> {
        Self::start_with_training(loaded, config, policy, drafter, online, None)
    }

    /// As `start`, with the training API on when `training` is given: models trained through it
    /// share the served model's weights, and their samples go through the same engine.
    pub fn start_with_training(
        loaded: LoadedModel,
        config: EngineConfig,
        policy: Box<dyn SchedulingPolicy>,
        drafter: Option<ServedDrafter>,
        online: Option<OnlineHooks>,
        training: Option<training::TrainingConfig>,
    ) -> Result<(Arc<AppState>, std::thread::JoinHandle<()>), String> {
        let template = ChatTemplate::new(
            loaded.chat_template.as_deref(),
            loaded.bos_token.as_deref(),
            loaded.eos_token.as_deref(),
        )?;
        let c = &loaded.model.config;
        let kv_bytes_per_block = c.kv_bytes_per_token() * tandem_models::BLOCK;
        // The training service holds the same weights as the engine (tensors are shared, not copied).
        let base = training.as_ref().map(|_| loaded.model.clone());
        let (mut engine, handle) = Engine::new(loaded.model, config, policy).map_err(|e| e.to_string())?;
        if let Some(d) = drafter {
            engine = engine.with_served_drafter(d).map_err(|e| e.to_string())?;
        }
        if let Some(hooks) = &online {
            engine = engine.with_online(hooks.clone()).map_err(|e| e.to_string())?;
        }
        let thread = engine.spawn();
        let tokenizer = Arc::new(loaded.tokenizer);
        let training = match (training, base) {
            (Some(mut tc), Some(base)) => {
                if tc.model_dir.is_none() && tc.tokenizer_dir.is_none() {
                    let dir = tc.root.join("tokenizer").join(&loaded.name);
                    match tandem_models::loader::save_tokenizer(
                        &dir,
                        &tokenizer,
                        loaded.chat_template.as_deref(),
                        loaded.bos_token.as_deref(),
                        loaded.eos_token.as_deref(),
                    ) {
                        Ok(()) => tc.tokenizer_dir = Some(dir),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not write the tokenizer folder for training clients")
                        }
                    }
                }
                Some(training::TrainingService::new(base, loaded.name.clone(), tc, handle.clone(), tokenizer.clone()))
            }
            _ => None,
        };
        let state = AppState {
            engine: handle,
            tokenizer,
            template: Arc::new(template),
            model_name: loaded.name,
            stop_token_ids: loaded.stop_token_ids,
            metrics: Arc::new(Metrics::default()),
            kv_bytes_per_block,
            next_id: AtomicU64::new(1),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            online,
            training,
        };
        Ok((Arc::new(state), thread))
    }
}

/// Counts every response by endpoint and status, and turns a panic in a handler into a 500 for
/// that request alone.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = req.uri().path().to_string();
    let resp = match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(r) => r,
        Err(_) => ApiError::internal("internal error while handling the request").into_response(),
    };
    state.metrics.count_request(&endpoint, resp.status().as_u16());
    resp
}

/// Training requests carry whole batches of token sequences.
pub const MAX_TRAINING_BODY_BYTES: usize = 64 * 1024 * 1024;

/// How the HTTP server treats its clients: keys, and how long it waits for them.
#[derive(Clone)]
pub struct ServerOptions {
    pub auth: auth::AuthConfig,
    /// A request must be answered (its response started: streams then run on) within this.
    pub request_timeout: Duration,
    /// A connection must send a request's headers within this, and is closed after this long idle.
    pub idle_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            auth: auth::AuthConfig::default(),
            request_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Cuts a request off (408) when its response has not started within the request timeout: a
/// client that trickles its body, or a non-streaming generation longer than the operator allows
/// (dropping it cancels the generation).
async fn time_limit(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::with_status(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request was not answered within {} s (--request-timeout); stream long generations",
                limit.as_secs()
            ),
        )
        .into_response(),
    }
}

pub fn router(state: Arc<AppState>, options: &ServerOptions) -> Router {
    let mut app = Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .with_state(state.clone());
    if let Some(t) = &state.training {
        app = app.merge(training::router(t.clone()).layer(DefaultBodyLimit::max(MAX_TRAINING_BODY_BYTES)));
    }
    // Layers run outside in: count, authorize, then time the handler.
    app.fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(options.request_timeout, time_limit))
        .layer(middleware::from_fn_with_state(Arc::new(options.auth.clone()), auth::authorize))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
}

/// Serves on `listener` until `shutdown` resolves; then stops accepting connections, lets
/// running generations finish, and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    options: ServerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let engine = state.engine.clone();
    let app = router(state, &options);
    // HTTP/1.1 only (what OpenAI clients speak): hyper then times the first request's headers from
    // the moment a connection opens, and every later request's from when the connection went idle,
    // which closes silent, idle and header-trickling connections alike.
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(options.idle_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: refusing new requests, finishing running ones");
    engine.shutdown();
    graceful.shutdown().await;
    Ok(())
}
