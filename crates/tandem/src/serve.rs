//! `tandem serve`: the OpenAI-compatible server.
use anyhow::{bail, Context, Result};
use std::time::Duration;
use tandem_cli::online_arg::{self, OnlineArgs};
use tandem_cli::schedule_arg::{self, ScheduleArgs};
use tandem_cli::spec_arg::{self, SpecArgs};
use tandem_cli::{device, load_model, models, DtypeArg};
use tandem_engine::EngineConfig;
use tandem_server::training::TrainingLimits;
use tandem_server::ServerOptions;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// A .gguf file, an HF model folder, `smollm2` / `qwen-coder` (default: smollm2), or a Hugging
    /// Face repository `org/name` (`org/name:file.gguf` for one GGUF file). Repeat it to serve
    /// several models, each with its own engine and KV budget (requests pick one by `model`,
    /// its name or the name given here; the first is the default and carries the training API,
    /// online drafter training and any drafter but n-gram, which every model gets).
    #[arg(long)]
    model: Vec<String>,
    /// A virtual model that evolves its answers over the served models (RSA or Squeeze Evolve):
    /// NAME=CONFIG.json (see docs/evolve.md). Repeatable.
    #[arg(long, value_name = "NAME=CONFIG")]
    evolve: Vec<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Sequences generated at once, at most (the KV budget may hold fewer).
    #[arg(long, default_value_t = EngineConfig::default().max_batch)]
    max_batch: usize,
    /// KV cache memory per model, e.g. 512MiB or 2GiB: a pool of 16-token blocks that sequences
    /// take as they grow and give back when they end (a sequence is preempted when the running
    /// ones' next steps do not fit). Default: --max-batch sequences of up to 4096 tokens.
    #[arg(long)]
    kv_budget: Option<String>,
    /// Longest sequence, prompt plus output, in tokens. Default: the model's context, or what
    /// the KV budget holds if that is less.
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Sequences start on the cached KV blocks of earlier ones with the same prompt prefix and
    /// weights (a repeated system prompt, an agent's history, the samples of one RL prompt):
    /// those tokens are not computed or charged again.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    prefix_cache: Switch,
    /// Tokens per engine step: decodes first, prompt chunks fill the rest. Larger prefills faster;
    /// smaller keeps other streams' inter-token latency low while long prompts are read.
    #[arg(long, default_value_t = EngineConfig::default().step_token_budget)]
    step_token_budget: usize,
    /// Requests that may wait for a slot before new ones get 503 + Retry-After.
    #[arg(long, default_value_t = EngineConfig::default().max_waiting)]
    max_waiting: usize,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    #[command(flatten)]
    cache: tandem_cli::CacheArgs,
    /// Seconds running requests get to finish after SIGTERM / Ctrl-C.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    #[arg(long)]
    cuda: Option<usize>,
    #[command(flatten)]
    spec: SpecArgs,
    #[command(flatten)]
    pub online: OnlineArgs,
    #[command(flatten)]
    pub fleet: crate::fleet::FleetArgs,
    #[command(flatten)]
    schedule: ScheduleArgs,
    /// The RL training API (Tinker-compatible, under /api/v1): trains LoRA or full weights of
    /// the served model in this process and samples from them through the same engine.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    training_api: Switch,
    /// Where the training API keeps checkpoints (tinker://RUN/KIND/NAME -> DIR/RUN/KIND/NAME).
    /// Default: $TANDEM_DATA/training, else ~/.local/share/tandem/training.
    #[arg(long)]
    training_dir: Option<std::path::PathBuf>,
    /// Where `POST /tandem/v1/export` writes merged models (a client names the folder, never a
    /// path). Default: the training directory's `exports/`.
    #[arg(long)]
    export_dir: Option<std::path::PathBuf>,
    /// Memory that training passes may hold at once, e.g. `8GiB`, `512MiB` (a forward_backward
    /// whose estimated peak exceeds it is refused with the estimate; smaller ones wait their
    /// turn). Default: half of the memory available at start.
    #[arg(long)]
    training_memory: Option<String>,
    /// Training models (LoRA or full) the training API holds at once.
    #[arg(long, default_value_t = TrainingLimits::default().max_models)]
    max_training_models: usize,
    /// Full-weight training models held at once (each is a copy of every weight plus gradients
    /// and optimizer state: ~2 GB for SmolLM2-135M).
    #[arg(long, default_value_t = TrainingLimits::default().max_full_models)]
    max_full_models: usize,
    /// Training models one Tinker session may hold at once.
    #[arg(long, default_value_t = TrainingLimits::default().max_session_models)]
    max_session_models: usize,
    /// Training requests (forward_backward, optim_step, sample, save...) submitted and not yet
    /// finished, all clients together; more get 429 until results are retrieved.
    #[arg(long, default_value_t = TrainingLimits::default().max_pending)]
    max_pending_requests: usize,
    /// Sampling sessions kept (each holds a copy of its adapter weights; an RL loop makes one per
    /// step); beyond it the least recently used is dropped.
    #[arg(long, default_value_t = TrainingLimits::default().max_samplers)]
    max_samplers: usize,
    /// Disk the training directory may fill with checkpoints, e.g. `20GiB` (a save that would
    /// pass it is refused). Default: half of the free space where it lives at start.
    #[arg(long)]
    training_disk: Option<String>,
    /// Seconds after which a Tinker session that sent no request or heartbeat ends (its training
    /// models are unloaded; saved checkpoints stay).
    #[arg(long, default_value_t = TrainingLimits::default().session_timeout.as_secs())]
    session_timeout: u64,
    /// Require this key on every route but /health (`Authorization: Bearer KEY` or `X-API-Key`).
    /// Repeatable; `@PATH` reads one key per line from a file (keeps keys out of `ps`).
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true, value_delimiter = ',')]
    api_key: Vec<String>,
    /// Keys for the training API (then the only keys it accepts besides admin keys). Same forms.
    #[arg(long)]
    training_api_key: Vec<String>,
    /// Keys for every route, including exports (then the only keys exports accept). Same forms.
    #[arg(long)]
    admin_api_key: Vec<String>,
    /// With keys on, let `X-Tandem-Client` name the client charged for a request (a trusted
    /// gateway in front); otherwise the key is the client and the header names an agent in it.
    #[arg(long)]
    trust_client_header: bool,
    /// Seconds a request may take before its response starts (streams then run on); 408 after.
    #[arg(long, default_value_t = ServerOptions::default().request_timeout.as_secs())]
    request_timeout: u64,
    /// Seconds a connection may sit idle, or take to send a request's headers, before it is closed.
    #[arg(long, default_value_t = ServerOptions::default().idle_timeout.as_secs())]
    idle_timeout: u64,
}

impl ServeArgs {
    /// The HTTP server's keys and timeouts.
    fn server_options(&self) -> Result<tandem_server::ServerOptions> {
        let keys = |v: &[String], flag: &str| {
            tandem_server::auth::AuthConfig::read_keys(v).map_err(anyhow::Error::msg).with_context(|| flag.to_string())
        };
        Ok(tandem_server::ServerOptions {
            auth: tandem_server::auth::AuthConfig {
                api_keys: keys(&self.api_key, "--api-key")?,
                training_keys: keys(&self.training_api_key, "--training-api-key")?,
                admin_keys: keys(&self.admin_api_key, "--admin-api-key")?,
                trust_client_header: self.trust_client_header,
            },
            request_timeout: Duration::from_secs(self.request_timeout.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout.max(1)),
        })
    }
}

/// Half of the memory the kernel says is available now (MemAvailable), or 4 GiB where unknown.
fn default_training_memory() -> u64 {
    let kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    kib.map_or(4 << 30, |k| k * 1024 / 2)
}

/// Half of the free space on the filesystem holding `dir` (or its nearest existing parent), or
/// 10 GiB where unknown.
fn default_training_disk(dir: &std::path::Path) -> u64 {
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(std::path::Path::new("/"));
    let free = std::process::Command::new("df")
        .args(["-Pk"])
        .arg(existing)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().nth(1)?.split_whitespace().nth(3)?.parse::<u64>().ok());
    free.map_or(10 << 30, |kib| kib * 1024 / 2)
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// The engine settings for one model, and its KV pool in tokens.
fn engine_config(args: &ServeArgs, loaded: &tandem_models::LoadedModel) -> Result<EngineConfig> {
    let per_token = loaded.model.config.kv_bytes_per_token();
    let max_batch = args.max_batch.max(1);
    let context = loaded.model.max_positions();
    let kv_tokens = match &args.kv_budget {
        Some(b) => tandem_cli::parse_size(b)? / per_token,
        None => max_batch * context.min(4096),
    };
    // One sequence may use the whole pool, up to the model's context.
    let max_seq_len = args.max_seq_len.unwrap_or(context).min(context).min(kv_tokens);
    if max_seq_len < 64 {
        bail!(
            "{}: sequences of at most {max_seq_len} tokens (the KV budget holds {kv_tokens} of {per_token} bytes); \
             give --max-seq-len and --kv-budget room for at least 64",
            loaded.name
        );
    }
    Ok(EngineConfig {
        max_batch,
        max_seq_len,
        max_waiting: args.max_waiting,
        step_token_budget: args.step_token_budget,
        spec_k: args.spec.spec_k,
        spec_adaptive: !args.spec.spec_fixed_k,
        spec_alternatives: args.spec.spec_alternatives,
        swap_bytes: None,
        kv_tokens: Some(kv_tokens),
        prefix_cache: args.prefix_cache == Switch::On,
    })
}

/// `--evolve NAME=CONFIG.json` as (name, configuration), with errors that say which flag.
fn evolve_configs(args: &ServeArgs) -> Result<Vec<(String, tandem_evolve::EvolveConfig)>> {
    args.evolve
        .iter()
        .map(|spec| {
            let (name, path) =
                spec.split_once('=').with_context(|| format!("--evolve {spec}: expected NAME=CONFIG.json"))?;
            let text = std::fs::read_to_string(path).with_context(|| format!("--evolve {name}: reading {path}"))?;
            let config = tandem_evolve::EvolveConfig::from_json(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("--evolve {name} ({path})"))?;
            Ok((name.to_string(), config))
        })
        .collect()
}

/// A started model: its state, the names it was asked by, and its engine thread.
type Started = (std::sync::Arc<tandem_server::AppState>, Vec<String>, std::thread::JoinHandle<()>);

/// Every model after the first: its own engine and policy, n-gram speculation if asked for.
fn start_more(args: &ServeArgs, opts: &tandem_models::LoadOptions) -> Result<Vec<Started>> {
    let mut out = Vec::new();
    for name in args.model.iter().skip(1) {
        let loaded = load_model(&models::resolve(Some(name))?, opts)?;
        let config = engine_config(args, &loaded)?;
        let drafter = match args.spec.spec.as_str() {
            "ngram" => spec_arg::build(&args.spec, &loaded, opts)?.map(tandem_engine::ServedDrafter::Fixed),
            _ => None,
        };
        let policy = schedule_arg::build(&args.schedule)?;
        let (state, thread) =
            tandem_server::AppState::start(loaded, config, policy, drafter, None).map_err(anyhow::Error::msg)?;
        out.push((state, vec![name.clone()], thread));
    }
    Ok(out)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let server_options = args.server_options()?;
    let evolving = evolve_configs(&args)?;
    let path = models::resolve(args.model.first().map(String::as_str))?;
    let opts = args.cache.apply(args.dtype.load_options(device(args.cuda)?));
    let loaded = load_model(&path, &opts)?;
    let config = engine_config(&args, &loaded)?;
    let (max_batch, max_seq_len, kv_tokens) = (config.max_batch, config.max_seq_len, config.kv_tokens.unwrap_or(0));
    args.fleet.check(&args.spec.spec, args.online.enabled())?;
    let (drafter, online, trainer) = if args.online.enabled() {
        if !args.spec.spec.starts_with("eagle") {
            bail!("--spec-train online trains an EAGLE drafter: add --spec eagle");
        }
        let eagle = spec_arg::build_eagle(&args.spec, &loaded)?;
        let (hooks, trainer) = online_arg::start(&args.online, &loaded.model, &eagle, args.spec.warm_start)?;
        eprintln!(
            "online drafter training on: checkpoints in {}{}",
            args.online.drafter_save_dir().display(),
            args.online.trace_dir.as_ref().map(|d| format!(", traces in {}", d.display())).unwrap_or_default()
        );
        (Some(tandem_engine::ServedDrafter::Trained(Box::new(eagle))), Some(hooks), Some(trainer))
    } else if args.fleet.needs_hooks() && args.spec.spec.starts_with("eagle") {
        // Learned elsewhere: a fleet trainer, or versions an operator puts on disk.
        let eagle = spec_arg::build_eagle(&args.spec, &loaded)?;
        let buffer = if args.fleet.trace_sink.is_some() { args.online.trace_buffer_mib } else { 0 };
        let hooks = tandem_engine::online::OnlineHooks::new(buffer << 20);
        (Some(tandem_engine::ServedDrafter::Trained(Box::new(eagle))), Some(hooks), None)
    } else {
        (spec_arg::build(&args.spec, &loaded, &opts)?.map(tandem_engine::ServedDrafter::Fixed), None, None)
    };
    let policy = schedule_arg::build(&args.schedule)?;
    let training = if args.training_api == Switch::On {
        let root = args.training_dir.clone().unwrap_or_else(|| tandem_cli::models::data_dir().join("training"));
        let memory_budget = match &args.training_memory {
            Some(s) => tandem_cli::parse_size(s).context("--training-memory")? as u64,
            None => default_training_memory(),
        };
        let disk_bytes = match &args.training_disk {
            Some(s) => tandem_cli::parse_size(s).context("--training-disk")? as u64,
            None => default_training_disk(&root),
        };
        Some(tandem_server::training::TrainingConfig {
            weight_store: crate::fleet::weight_store(&args.fleet)?,
            export_dir: args.export_dir.clone().unwrap_or_else(|| root.join("exports")),
            root,
            model_dir: path.is_dir().then(|| path.clone()),
            tokenizer_dir: None,
            memory_budget,
            limits: tandem_server::training::TrainingLimits {
                max_models: args.max_training_models,
                max_full_models: args.max_full_models,
                max_session_models: args.max_session_models,
                max_pending: args.max_pending_requests,
                max_samplers: args.max_samplers,
                disk_bytes,
                session_timeout: Duration::from_secs(args.session_timeout.max(1)),
            },
        })
    } else {
        None
    };
    let online_hooks = online.clone();
    let (state, engine_thread) =
        tandem_server::AppState::start_with_training(loaded, config, policy, drafter, online, training)
            .map_err(anyhow::Error::msg)?;
    let state_name = state.model_name.clone();
    let more = start_more(&args, &opts)?;
    let mut served = vec![(state, args.model.first().cloned().into_iter().collect::<Vec<_>>())];
    let mut threads = vec![engine_thread];
    for (state, names, thread) in more {
        served.push((state, names));
        threads.push(thread);
    }
    let mut fleet = crate::fleet::Fleet::start_broker(&args.fleet, &state_name, online_hooks.as_ref());
    let controls = tandem_server::worker::WorkerControls::new(args.fleet.weights_dir.clone(), fleet.metrics());
    let server = tandem_server::Server::new(served, evolving, controls).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let grace = Duration::from_secs(args.shutdown_grace);
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        eprintln!(
            "tandem serving {} on http://{} (up to {} sequences of up to {} tokens, KV pool of {} tokens{})",
            server.served_names().join(", "),
            listener.local_addr()?,
            max_batch,
            max_seq_len,
            kv_tokens,
            if server_options.auth.enabled() { ", API keys required" } else { "" }
        );
        fleet.join(&args.fleet, &args.host, listener.local_addr()?.port());
        let fleet = std::sync::Arc::new(fleet);
        let leaving = fleet.clone();
        let shutdown = async move {
            wait_for_signal().await;
            // Out of the gateway first, so it sends nothing more while running requests finish.
            let _ = tokio::task::spawn_blocking(move || leaving.leave()).await;
            // Requests still running after the grace period are cut off.
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                eprintln!("shutdown grace period over; exiting");
                std::process::exit(0);
            });
        };
        tandem_server::serve(listener, server, server_options, shutdown).await?;
        anyhow::Ok(())
    })?;
    for t in threads {
        let _ = t.join();
    }
    if let Some(t) = trainer {
        // Writes the final drafter checkpoint.
        t.shutdown();
    }
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse() {
        assert_eq!(tandem_cli::parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(tandem_cli::parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(tandem_cli::parse_size("1000").unwrap(), 1000);
        assert!(tandem_cli::parse_size("12 parsecs").is_err());
    }
}
