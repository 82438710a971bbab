//! tandem-server: the OpenAI-compatible HTTP API over the engine (axum + tokio).
mod api;
pub mod auth;
mod choice;
mod error;
pub mod evolve;
mod metrics;
mod prompt;
mod routes;
mod score;
mod stop;
mod structured;
mod tokens;
mod tools;
pub mod training;
pub mod worker;

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

/// What every route handler is handed: the server.
pub(crate) type Shared = axum::extract::State<Arc<Server>>;

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
    /// Entries of the model's logits (the grammar engine's vocabulary).
    pub vocab_size: usize,
    /// The grammar compiler for structured outputs, made on the first request that asks for one.
    grammars: std::sync::OnceLock<Result<Arc<tandem_runtime::Grammars>, String>>,
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
        let vocab_size = c.vocab_size;
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
            vocab_size,
            grammars: std::sync::OnceLock::new(),
        };
        Ok((Arc::new(state), thread))
    }

    /// The model's grammar compiler (built once, from its tokenizer's tokens: 0.2-0.7 s, during which
    /// a multi-threaded runtime moves this worker's other tasks elsewhere).
    pub fn grammars(&self) -> Result<Arc<tandem_runtime::Grammars>, String> {
        let build = || {
            tandem_runtime::Grammars::new(self.tokenizer.clone(), self.vocab_size, &self.stop_token_ids).map(Arc::new)
        };
        let init = || self.grammars.get_or_init(build).clone();
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) if self.grammars.get().is_none() => {
                tokio::task::block_in_place(init)
            }
            _ => init(),
        }
    }
}

/// What one server serves: its models, each with its own engine (the first is the default and
/// holds the training API), and virtual models that evolve answers over them.
pub struct Server {
    pub models: Vec<Arc<AppState>>,
    /// Every name a request may give for a model (its own name and the names it was asked by),
    /// with its index in `models`.
    names: Vec<(String, usize)>,
    pub evolving: Vec<Arc<evolve::Evolving>>,
    /// What the fleet's controls (`/update_weights_from_disk`, ...) may do and have done.
    pub controls: worker::WorkerControls,
}

/// What a request's `model` names.
pub(crate) enum Target {
    Model(Arc<AppState>),
    Evolving(Arc<evolve::Evolving>),
}

impl Server {
    /// One model, nothing else.
    pub fn one(state: Arc<AppState>) -> Arc<Server> {
        Arc::new(Server {
            names: vec![(state.model_name.clone(), 0)],
            models: vec![state],
            evolving: Vec::new(),
            controls: Default::default(),
        })
    }

    /// Several models (each with the extra names it may be asked by: the alias or path it was
    /// given as) and evolving models over them. Names must be unique; each evolving model's
    /// configuration must name served models it fits.
    pub fn new(
        models: Vec<(Arc<AppState>, Vec<String>)>,
        evolving: Vec<(String, tandem_evolve::EvolveConfig)>,
        controls: worker::WorkerControls,
    ) -> Result<Arc<Server>, String> {
        if models.is_empty() {
            return Err("a server needs at least one model".into());
        }
        let mut names: Vec<(String, usize)> = Vec::new();
        fn add(name: &str, i: usize, names: &mut Vec<(String, usize)>) -> Result<(), String> {
            match names.iter().find(|n| n.0 == name) {
                Some((_, j)) if *j == i => Ok(()),
                Some(_) => Err(format!("two models are called `{name}`")),
                None => {
                    names.push((name.to_string(), i));
                    Ok(())
                }
            }
        }
        for (i, (state, aliases)) in models.iter().enumerate() {
            add(&state.model_name, i, &mut names)?;
            for a in aliases {
                add(a, i, &mut names)?;
            }
        }
        let models: Vec<Arc<AppState>> = models.into_iter().map(|m| m.0).collect();
        let mut virtuals = Vec::new();
        for (name, config) in evolving {
            if names.iter().any(|n| n.0 == name) || virtuals.iter().any(|v: &Arc<evolve::Evolving>| v.name == name) {
                return Err(format!("--evolve {name}: that name is already a model's"));
            }
            let find = |m: &str| names.iter().find(|n| n.0 == m).map(|n| models[n.1].clone());
            config
                .check_models(|m| find(m).map(|s| s.engine.config().max_seq_len))
                .map_err(|e| format!("--evolve {name}: {e}"))?;
            let tiers = config.models().iter().map(|m| (m.to_string(), find(m).expect("checked"))).collect();
            virtuals.push(Arc::new(evolve::Evolving::new(name, config, tiers)));
        }
        Ok(Arc::new(Server { models, names, evolving: virtuals, controls }))
    }

    /// The default model (the first).
    pub fn first(&self) -> &Arc<AppState> {
        &self.models[0]
    }

    /// The model or evolving model a request names (None: the default model).
    pub(crate) fn target(&self, name: Option<&str>) -> Result<Target, ApiError> {
        let Some(name) = name else { return Ok(Target::Model(self.first().clone())) };
        if let Some((_, i)) = self.names.iter().find(|n| n.0 == name) {
            return Ok(Target::Model(self.models[*i].clone()));
        }
        if let Some(v) = self.evolving.iter().find(|v| v.name == name) {
            return Ok(Target::Evolving(v.clone()));
        }
        Err(ApiError::not_found(format!(
            "the model `{name}` does not exist; this server serves {}",
            self.served_names().join(", ")
        )))
    }

    /// The models' names, then the evolving models', as /v1/models lists them.
    pub fn served_names(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.model_name.as_str()).chain(self.evolving.iter().map(|v| v.name.as_str())).collect()
    }

    /// A model (not an evolving one) a request names.
    pub(crate) fn model(&self, name: Option<&str>) -> Result<Arc<AppState>, ApiError> {
        match self.target(name)? {
            Target::Model(m) => Ok(m),
            Target::Evolving(v) => Err(ApiError::bad_request(
                format!("`{}` evolves answers over other models: ask it through /v1/chat/completions", v.name),
                Some("model"),
            )),
        }
    }
}

/// Counts every response by endpoint and status, and turns a panic in a handler into a 500 for
/// that request alone.
async fn observe(State(server): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let endpoint = req.uri().path().to_string();
    let resp = match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(r) => r,
        Err(_) => ApiError::internal("internal error while handling the request").into_response(),
    };
    server.first().metrics.count_request(&endpoint, resp.status().as_u16());
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

pub fn router(server: Arc<Server>, options: &ServerOptions) -> Router {
    let mut app = Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/tandem/v1/score", post(score::score))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{*id}", get(routes::model))
        .route("/tokenize", post(tokens::tokenize_route))
        .route("/detokenize", post(tokens::detokenize_route))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/server_info", get(worker::server_info))
        .route("/get_server_info", get(worker::server_info))
        .route("/model_info", get(worker::model_info))
        .route("/get_model_info", get(worker::model_info))
        .route("/get_load", get(worker::get_load))
        .route("/v1/loads", get(worker::loads))
        .route("/flush_cache", post(worker::flush_cache))
        .route("/pause_generation", post(worker::pause_generation))
        .route("/continue_generation", post(worker::continue_generation))
        .route("/update_weights_from_disk", post(worker::update_weights_from_disk))
        .with_state(server.clone());
    if let Some(t) = &server.first().training {
        app = app.merge(training::router(t.clone()).layer(DefaultBodyLimit::max(MAX_TRAINING_BODY_BYTES)));
    }
    // Layers run outside in: count, authorize, then time the handler.
    app.fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(options.request_timeout, time_limit))
        .layer(middleware::from_fn_with_state(Arc::new(options.auth.clone()), auth::authorize))
        .layer(middleware::from_fn_with_state(server.clone(), observe))
}

/// Serves on `listener` until `shutdown` resolves; then stops accepting connections, lets
/// running generations finish, and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Arc<Server>,
    options: ServerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let engines: Vec<EngineHandle> = server.models.iter().map(|m| m.engine.clone()).collect();
    let app = router(server, &options);
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
    for engine in &engines {
        engine.shutdown();
    }
    graceful.shutdown().await;
    Ok(())
}
