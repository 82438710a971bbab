//! The training service: sessions, training models (each on its own worker thread, running its
//! requests in seq_id order), weight versions for sampling, and checkpoints on disk.
//!
//! Over 600 lines because the limits, sessions, model lifetimes and checkpoints all guard the same
//! maps; sampling is in `service/sampling.rs`, a model's worker thread and how it runs each
//! request in `service/worker.rs`, checkpoints on disk in `service/checkpoints.rs`, the
//! recent-use map in `service/recent.rs`.
use super::futures::{Completer, FutureStore};
use super::results::{ForwardBackwardResult, Outcome};
use checkpoints::read_mode;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tandem_engine::{EngineHandle, WeightVersion};
use tandem_models::{Model, Tokenizer};
use tandem_train::{AdamParams, Datum, Limits, LossFn, Mode, PassSize, TrainError, TrainingModel};

mod checkpoints;
mod recent;
mod sampling;
mod worker;
pub use sampling::{SampleRequest, Stop};

/// Where and how the service runs.
#[derive(Debug, Clone)]
pub struct TrainingConfig {
    /// Checkpoints live under `root/<run id>/{weights,sampler_weights}/<name>`.
    pub root: PathBuf,
    /// The folder the served model was loaded from, if a Hugging Face folder (clients load its
    /// tokenizer; merged exports copy its config).
    pub model_dir: Option<PathBuf>,
    /// A folder with the served tokenizer as `tokenizer.json` (+ `tokenizer_config.json`), for
    /// clients that load it (`TrainingClient.get_tokenizer()`); set by `AppState`.
    pub tokenizer_dir: Option<PathBuf>,
    /// Merged exports go to `export_dir/<name>`, a name the client gives (never a path).
    pub export_dir: PathBuf,
    /// Bytes that training passes may hold at once (estimated by `tandem_train::memory`).
    pub memory_budget: u64,
    pub limits: TrainingLimits,
    /// Where sampler weights are shared with the other servers of a fleet (None: this server
    /// alone has them).
    pub weight_store: Option<Arc<dyn WeightStore>>,
}

/// A fleet's shared checkpoint store: a server that saves sampler weights offers them, and a
/// server asked for weights it does not have fetches them, so a Tinker client's trained weights
/// sample on any server.
pub trait WeightStore: Send + Sync + std::fmt::Debug {
    /// Offers the checkpoint folder `dir` saved as `path` (a `tinker://` path) to the fleet;
    /// returns once the store holds it.
    fn publish(&self, path: &str, dir: &std::path::Path) -> std::result::Result<(), String>;
    /// Writes the checkpoint saved as `path` into `dir`; false when the fleet has none.
    fn fetch(&self, path: &str, dir: &std::path::Path) -> std::result::Result<bool, String>;
}

/// What the training API may hold at once; each refusal names its flag.
#[derive(Debug, Clone, Copy)]
pub struct TrainingLimits {
    /// Training models (`--max-training-models`).
    pub max_models: usize,
    /// Full-weight training models (`--max-full-models`).
    pub max_full_models: usize,
    /// Training models one session may hold (`--max-session-models`).
    pub max_session_models: usize,
    /// Requests submitted and not finished yet, all clients together (`--max-pending-requests`).
    pub max_pending: usize,
    /// Sampling sessions kept, the least recently used dropped first (`--max-samplers`).
    pub max_samplers: usize,
    /// Bytes of checkpoints under the training directory (`--training-disk`).
    pub disk_bytes: u64,
    /// A session unheard of for this long ends, and its models are unloaded (`--session-timeout`).
    pub session_timeout: std::time::Duration,
}

impl Default for TrainingLimits {
    /// The defaults of `tandem serve`'s flags (the disk bound there is half the free disk).
    fn default() -> Self {
        TrainingLimits {
            max_models: 16,
            max_full_models: 1,
            max_session_models: 4,
            max_pending: 1024,
            max_samplers: 64,
            disk_bytes: u64::MAX,
            session_timeout: std::time::Duration::from_secs(600),
        }
    }
}

/// Training memory held by one running pass; released (and waiters woken) on drop.
struct MemoryHold<'a> {
    service: &'a TrainingService,
    bytes: u64,
}

impl Drop for MemoryHold<'_> {
    fn drop(&mut self) {
        *self.service.memory_held.lock().unwrap_or_else(std::sync::PoisonError::into_inner) -= self.bytes;
        self.service.memory_freed.notify_all();
    }
}

/// Whose a failure is: the caller's (bad input, or a request that would replace something that
/// exists) or ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    User,
    Conflict,
    /// A limit on what is pending or held was reached: retry later (429).
    Busy,
    Server,
}

#[derive(Debug)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn user(m: impl Into<String>) -> Self {
        Failure { kind: FailureKind::User, message: m.into() }
    }
    pub fn server(m: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Server, message: m.into() }
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Conflict, message: m.into() }
    }
    pub fn busy(m: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Busy, message: m.into() }
    }
    /// The caller's to fix (a conflict included).
    pub fn is_user(&self) -> bool {
        self.kind != FailureKind::Server
    }
}

/// The engine's refusals as training-API failures: the caller's mistakes are user errors, a full
/// queue is busy (retry), a stopping engine a server error.
impl From<tandem_engine::EngineError> for Failure {
    fn from(e: tandem_engine::EngineError) -> Self {
        use tandem_engine::EngineError as E;
        match e {
            E::QueueFull(_) => Failure::busy(e.to_string()),
            E::ShuttingDown => Failure::server(e.to_string()),
            E::EmptyPrompt | E::PromptTooLong { .. } | E::Invalid(_) | E::InvalidParam { .. } => {
                Failure::user(e.to_string())
            }
        }
    }
}

impl From<TrainError> for Failure {
    fn from(e: TrainError) -> Self {
        if e.is_user() {
            Failure::user(e.to_string())
        } else {
            Failure::server(e.to_string())
        }
    }
}

impl From<Failure> for Outcome {
    fn from(f: Failure) -> Self {
        if f.is_user() {
            Outcome::failed_user(f.message)
        } else {
            Outcome::failed_server(f.message)
        }
    }
}

pub type Result<T> = std::result::Result<T, Failure>;

/// A sample request's future id and one id per sampled sequence.
type SampleIds = (String, Vec<String>);

/// What a training model does for one request.
pub enum Work {
    ForwardBackward {
        data: Vec<Datum>,
        loss: LossFn,
        forward_only: bool,
    },
    OptimStep(AdamParams),
    SaveWeights {
        name: String,
    },
    /// Saved under `name`, or (without one) straight into a new sampling session.
    SaveForSampler {
        name: Option<String>,
        session: Option<String>,
    },
    LoadWeights {
        path: String,
        optimizer: bool,
    },
    /// A request that was malformed: it fails in its turn (category user).
    Fail(String),
}

struct Job {
    work: Work,
    done: Completer,
    /// Whom the scheduling policy charges for it (`tinker_client`).
    client: Client,
}

/// A client (and agent within it) as the scheduling policy counts it.
pub type Client = (String, Option<String>);

/// The entity a Tinker session's work is charged to, sampling and training alike: the client its
/// API key names (the session an agent within it), else the session itself.
pub fn tinker_client(key_client: Option<String>, session: &str) -> Client {
    match key_client {
        Some(k) => (k, Some(format!("tinker:{session}"))),
        None => (format!("tinker:{session}"), None),
    }
}

/// Requests of one model wait here until every earlier seq_id has arrived.
#[derive(Default)]
struct SeqQueue {
    next: i64,
    waiting: BTreeMap<i64, Job>,
    /// seq_id -> request id, so a resubmission gets the same future.
    seen: HashMap<i64, String>,
}

pub struct TrainedModel {
    pub id: String,
    pub mode: Mode,
    queue: Mutex<SeqQueue>,
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl TrainedModel {
    /// The session that created it (`{session}:train:{seq}`), or its own name (xorl's named models).
    pub fn session(&self) -> &str {
        self.id.split(":train:").next().unwrap_or(&self.id)
    }
}

pub struct Sampler {
    /// The session that created it (it ends with that session).
    pub session: Option<String>,
    pub base_model: String,
    pub model_path: Option<String>,
    pub weights: Option<WeightVersion>,
}

pub struct TrainingService {
    pub base: Model,
    pub base_name: String,
    pub config: TrainingConfig,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub futures: FutureStore,
    sessions: Mutex<HashMap<String, std::time::Instant>>,
    models: Mutex<HashMap<String, Arc<TrainedModel>>>,
    /// Sampling sessions, the least recently used dropped beyond `--max-samplers` (an RL loop
    /// makes one per step) or once unused for `--session-timeout`.
    samplers: Mutex<Recent<Arc<Sampler>>>,
    /// (sampling session, seq_id) -> request id.
    samples_seen: Mutex<HashMap<(String, i64), SampleIds>>,
    /// Sampler weights by tinker path, kept in memory once saved or loaded.
    versions: Mutex<Recent<WeightVersion>>,
    /// Sampler weights by checkpoint name, for SGLang-style `/generate` requests (xorl-client
    /// names the adapter by its checkpoint name alone).
    lora_names: Mutex<HashMap<String, String>>,
    next_version: AtomicU64,
    next_id: AtomicU64,
    /// Estimated bytes held by the training passes running now (at most `memory_budget`).
    memory_held: Mutex<u64>,
    memory_freed: std::sync::Condvar,
    me: std::sync::Weak<TrainingService>,
}

/// Checkpoint and run names become folder names: keep them to a safe alphabet.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Failure::user(format!("`{name}` is not a valid name (letters, digits, - _ . : only)")))
    }
}

use recent::Recent;

/// Sampler weights of saved checkpoints kept in memory (others are read from disk again when
/// asked for).
const VERSIONS_IN_MEMORY: usize = 16;

/// Bytes of the files under `dir` (symbolic links not followed; unreadable entries count 0).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// A parsed `tinker://<run>/<kind>/<name>` path.
pub struct TinkerPath {
    pub run: String,
    pub kind: String,
    pub name: String,
}

impl TinkerPath {
    pub fn parse(path: &str) -> Result<Self> {
        let rest =
            path.strip_prefix("tinker://").ok_or_else(|| Failure::user(format!("`{path}` is not a tinker:// path")))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [run, kind, name] = parts[..] else {
            return Err(Failure::user(format!("`{path}` is not tinker://<run>/<weights|sampler_weights>/<name>")));
        };
        if kind != "weights" && kind != "sampler_weights" {
            return Err(Failure::user(format!("`{path}`: unknown checkpoint kind `{kind}`")));
        }
        check_name(run)?;
        check_name(name)?;
        Ok(TinkerPath { run: run.into(), kind: kind.into(), name: name.into() })
    }

    pub fn to_path(&self) -> String {
        format!("tinker://{}/{}/{}", self.run, self.kind, self.name)
    }
}

impl TrainingService {
    pub fn new(
        base: Model,
        base_name: String,
        config: TrainingConfig,
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
    ) -> Arc<Self> {
        let max_samplers = config.limits.max_samplers;
        let service = Arc::new_cyclic(|me| TrainingService {
            base,
            base_name,
            config,
            engine,
            tokenizer,
            futures: FutureStore::default(),
            sessions: Mutex::default(),
            models: Mutex::default(),
            samplers: Mutex::new(Recent::new(max_samplers)),
            samples_seen: Mutex::default(),
            versions: Mutex::new(Recent::new(VERSIONS_IN_MEMORY)),
            lora_names: Mutex::default(),
            next_version: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            memory_held: Mutex::new(0),
            memory_freed: std::sync::Condvar::new(),
            me: me.clone(),
        });
        // Sessions end when unheard of for --session-timeout; look a few times per timeout.
        let weak = Arc::downgrade(&service);
        let every =
            (service.config.limits.session_timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
        let sweeper = std::thread::Builder::new().name("tandem-session-expiry".into()).spawn(move || loop {
            std::thread::sleep(every);
            match weak.upgrade() {
                Some(s) => s.expire_sessions(),
                None => return,
            }
        });
        if let Err(e) = sweeper {
            tracing::warn!(error = %e, "could not start the session expiry thread: sessions will not expire");
        }
        service
    }

    fn unique(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn create_session(&self) -> String {
        let id = format!("session-{}-{:08x}", self.unique(), rand::random::<u32>());
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.clone(), std::time::Instant::now());
        id
    }

    pub fn heartbeat(&self, session: &str) -> Result<()> {
        match self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(session) {
            Some(t) => {
                *t = std::time::Instant::now();
                Ok(())
            }
            None => Err(Failure::user(format!("unknown session_id `{session}`"))),
        }
    }

    /// A known session (any request naming it counts as a sign of life).
    fn check_session(&self, session: &str) -> Result<()> {
        match self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(session) {
            Some(seen) => {
                *seen = std::time::Instant::now();
                Ok(())
            }
            None => Err(Failure::user(format!(
                "unknown session_id `{session}` (sessions unheard of for --session-timeout end); create one with \
                 create_session"
            ))),
        }
    }

    /// Ends sessions unheard of for `--session-timeout`: their training models are unloaded and
    /// their sampling sessions dropped (saved checkpoints stay on disk).
    pub fn expire_sessions(&self) {
        let timeout = self.config.limits.session_timeout;
        self.samplers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, used| used.elapsed() <= timeout);
        let expired: Vec<String> = {
            let mut sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let old: Vec<String> =
                sessions.iter().filter(|(_, seen)| seen.elapsed() > timeout).map(|(id, _)| id.clone()).collect();
            for id in &old {
                sessions.remove(id);
            }
            old
        };
        for session in expired {
            let prefix = format!("{session}:");
            let mut models = self.models.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let unloaded: Vec<String> = models.keys().filter(|k| k.starts_with(&prefix)).cloned().collect();
            for id in &unloaded {
                models.remove(id);
            }
            drop(models);
            self.samplers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|s, _| s.session.as_deref() != Some(session.as_str()));
            tracing::info!(session, models = unloaded.len(), "session expired: no request or heartbeat in time");
        }
    }

    /// The served model answers to its own name, with or without an organisation prefix.
    pub fn check_base(&self, name: &str) -> Result<()> {
        let short = |s: &str| s.rsplit('/').next().unwrap_or(s).to_ascii_lowercase();
        if short(name) == short(&self.base_name) {
            Ok(())
        } else {
            Err(Failure::user(format!(
                "base_model `{name}` is not served here; this server trains `{}` (the model it serves)",
                self.base_name
            )))
        }
    }

    /// A training model by id; using a session's model counts as a sign of life of the session.
    pub fn model(&self, id: &str) -> Result<Arc<TrainedModel>> {
        if let Some((session, _)) = id.split_once(":train:") {
            if let Some(seen) = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(session)
            {
                *seen = std::time::Instant::now();
            }
        }
        self.models
            .lock()
            .expect("not poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| Failure::user(format!("unknown model_id `{id}`")))
    }

    /// A new training model `{session}:train:{seq}` with its worker thread.
    pub fn create_model(&self, session: &str, seq: i64, mode: Mode, seed: u64) -> Result<String> {
        self.check_session(session)?;
        let id = format!("{session}:train:{seq}");
        if self.models.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(&id) {
            return Ok(id); // a resubmitted create
        }
        let trainer = self.new_trainer(&id, mode, seed)?;
        tracing::info!(model_id = %id, ?mode, parameters = trainer.num_parameters(), "training model created");
        self.start_model(id.clone(), mode, trainer)?;
        Ok(id)
    }

    /// A model `id` to train on the served base, bounded by the served context and the memory
    /// budget; refused before any allocation when the server holds as many models as allowed.
    fn new_trainer(&self, id: &str, mode: Mode, seed: u64) -> Result<TrainingModel> {
        self.check_room(id, mode)?;
        let mut t = TrainingModel::new(&self.base, mode, seed)?;
        t.set_limits(Limits { max_tokens: self.engine.config().max_seq_len, memory_bytes: self.config.memory_budget });
        Ok(t)
    }

    /// Refuses a new model (one replacing `id` does not count) beyond `--max-training-models`,
    /// or a full-weight one beyond `--max-full-models` (each holds a copy of every weight plus
    /// gradients and optimizer state: ~2 GB for SmolLM2-135M).
    fn check_room(&self, id: &str, mode: Mode) -> Result<()> {
        let models = self.models.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let others: Vec<&Arc<TrainedModel>> = models.iter().filter(|(k, _)| k.as_str() != id).map(|(_, m)| m).collect();
        let full = others.iter().filter(|m| m.mode == Mode::Full).count();
        let limits = &self.config.limits;
        // Session models are named `{session}:train:{seq}`.
        if let Some((session, _)) = id.split_once(":train:") {
            let mine = models.keys().filter(|k| k.as_str() != id && k.starts_with(&format!("{session}:"))).count();
            if mine >= limits.max_session_models {
                return Err(Failure::user(format!(
                    "this session already holds {mine} training models, the limit per session \
                     (--max-session-models {}); unload one first",
                    limits.max_session_models
                )));
            }
        }
        if others.len() >= limits.max_models {
            return Err(Failure::user(format!(
                "this server already holds {} training models, its limit (--max-training-models {}); unload one first",
                others.len(),
                limits.max_models
            )));
        }
        if mode == Mode::Full && full >= limits.max_full_models {
            return Err(Failure::user(format!(
                "this server already holds {full} full-weight training models, its limit (--max-full-models {}); \
                 unload one or train LoRA adapters",
                limits.max_full_models
            )));
        }
        Ok(())
    }

    /// Waits until `bytes` more fit in the training memory budget, then holds them until the
    /// returned guard drops.
    fn hold_memory(&self, bytes: u64) -> MemoryHold<'_> {
        let bytes = bytes.min(self.config.memory_budget);
        let mut held = self.memory_held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *held + bytes > self.config.memory_budget {
            held = self.memory_freed.wait(held).expect("not poisoned");
        }
        *held += bytes;
        MemoryHold { service: self, bytes }
    }

    /// A training model under a name the client chose (xorl-client's form: no session). Creating
    /// a name again replaces that model (its queued requests still finish).
    pub fn create_named_model(&self, id: &str, mode: Mode, seed: u64) -> Result<String> {
        check_name(id)?;
        let trainer = self.new_trainer(id, mode, seed)?;
        tracing::info!(model_id = %id, ?mode, parameters = trainer.num_parameters(), "training model created");
        self.start_model(id.to_string(), mode, trainer)?;
        Ok(id.to_string())
    }

    /// Frees a training model (its thread ends once its queued requests are done).
    pub fn unload(&self, id: &str) -> Result<()> {
        match self.models.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id) {
            Some(_) => Ok(()),
            None => Err(Failure::user(format!("unknown model_id `{id}`"))),
        }
    }

    /// Makes the sampler weights at `path` addressable by their checkpoint name.
    pub fn register_lora_name(&self, path: &str) -> Result<String> {
        self.version_for(path)?;
        let name = TinkerPath::parse(path)?.name;
        self.lora_names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.clone(), path.to_string());
        Ok(name)
    }

    pub fn lora_by_name(&self, name: &str) -> Result<WeightVersion> {
        let path = self.lora_names.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned();
        if let Some(path) = path {
            return self.version_for(&path);
        }
        // A full path works too.
        if name.contains("://") {
            return self.version_for(name);
        }
        Err(Failure::user(format!("no sampler weights named `{name}`; save them and create a sampling session first")))
    }

    /// What a checkpoint holds (Tinker's and xorl's weights_info).
    pub fn weights_info(&self, path: &str) -> Result<Value> {
        let p = TinkerPath::parse(path)?;
        let mode = read_mode(&self.checkpoint_dir(&p))?;
        let (is_lora, rank, train_unembed, train_mlp, train_attn) = match mode {
            Mode::Lora(s) => (true, Some(s.rank), s.targets.unembed, s.targets.mlp, s.targets.attn),
            Mode::Full => (false, None, true, true, true),
        };
        Ok(json!({
            "base_model": self.base_name, "is_lora": is_lora, "lora_rank": rank,
            "train_unembed": train_unembed, "train_mlp": train_mlp, "train_attn": train_attn,
        }))
    }

    fn start_model(&self, id: String, mode: Mode, trainer: TrainingModel) -> Result<()> {
        let (tx, rx) = mpsc::channel::<Job>();
        let me = self.me.clone();
        let model_id = id.clone();
        std::thread::Builder::new()
            .name(format!("tandem-train-{}", self.unique()))
            .spawn(move || worker::worker(me, model_id, trainer, rx))
            .map_err(|e| Failure::server(format!("cannot start a training thread: {e}")))?;
        let entry = TrainedModel {
            id: id.clone(),
            mode,
            queue: Mutex::new(SeqQueue { next: 1, ..Default::default() }),
            jobs: Mutex::new(tx),
        };
        self.models.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id, Arc::new(entry));
        Ok(())
    }

    /// Queues `work` as request `seq` of `model`; runs it once every earlier seq_id has run.
    /// A resubmitted seq_id gets the first submission's request id.
    pub fn submit(&self, model: &TrainedModel, seq: i64, work: Work, client: Client) -> Result<String> {
        let mut q = model.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(id) = q.seen.get(&seq) {
            return Ok(id.clone());
        }
        if seq < q.next {
            return Err(Failure::user(format!(
                "seq_id {seq} of model {} was already used (next expected: {})",
                model.id, q.next
            )));
        }
        let (id, done) = self.new_future()?;
        q.seen.insert(seq, id.clone());
        q.waiting.insert(seq, Job { work, done, client });
        let jobs = model.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(job) = {
            let next = q.next;
            q.waiting.remove(&next)
        } {
            q.next += 1;
            if let Err(mpsc::SendError(job)) = jobs.send(job) {
                job.done.complete(Outcome::failed_server("the training thread has stopped"));
            }
        }
        Ok(id)
    }

    /// A future completed with `outcome` at once (requests with no ordering; never pending).
    pub fn immediate(&self, outcome: Outcome) -> String {
        let (id, done) = self.futures.create(usize::MAX).expect("no limit");
        done.complete(outcome);
        id
    }

    /// A pending future, within `--max-pending-requests`.
    pub fn new_future(&self) -> Result<(String, super::futures::Completer)> {
        let limit = self.config.limits.max_pending;
        self.futures.create(limit).map_err(|pending| {
            Failure::busy(format!(
                "{pending} training requests are pending, the server's limit (--max-pending-requests {limit}); \
                 retrieve results before submitting more"
            ))
        })
    }

    /// Refuses a write of about `adding` bytes that would take the training directory past
    /// `--training-disk`.
    fn check_disk(&self, adding: u64) -> Result<()> {
        let (used, limit) = (dir_bytes(&self.config.root), self.config.limits.disk_bytes);
        if used + adding > limit {
            return Err(Failure::user(format!(
                "the training directory holds {:.1} MB and this write needs about {:.1} MB more: over its limit \
                 (--training-disk {:.1} MB); delete checkpoints first",
                used as f64 / 1e6,
                adding as f64 / 1e6,
                limit as f64 / 1e6
            )));
        }
        Ok(())
    }

    fn checkpoint_dir(&self, p: &TinkerPath) -> PathBuf {
        self.config.root.join(&p.run).join(&p.kind).join(&p.name)
    }

    /// A new version of the training run `family`.
    fn register_version(&self, model: Model, family: &str) -> WeightVersion {
        let id = self.next_version.fetch_add(1, Ordering::Relaxed);
        WeightVersion { id, family: family.into(), model: Arc::new(model) }
    }

    /// The weights behind a sampler path: in memory, or loaded from disk.
    fn version_for(&self, path: &str) -> Result<WeightVersion> {
        let p = TinkerPath::parse(path)?;
        if let Some(v) = self.versions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&p.to_path()) {
            return Ok(v.clone());
        }
        let dir = self.checkpoint_dir(&p);
        if !dir.join("state.json").exists() {
            self.fetch_shared(path, &dir)?;
        }
        let mode = read_mode(&dir)?;
        let mut t = TrainingModel::new(&self.base, mode, 0)?;
        t.load(&dir, false)?;
        let v = self.register_version(t.snapshot()?, &p.run);
        self.versions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(p.to_path(), v.clone());
        Ok(v)
    }

    /// Sampler weights another server of the fleet saved, fetched into `dir` (nothing to do
    /// without a fleet store, or when it has none: the caller's error then says what is missing).
    fn fetch_shared(&self, path: &str, dir: &std::path::Path) -> Result<()> {
        let Some(store) = &self.config.weight_store else { return Ok(()) };
        match store.fetch(path, dir) {
            Ok(true) => {
                tracing::info!(path, "sampler weights fetched from the fleet's store");
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(Failure::server(format!("fetching `{path}` from the fleet's weight store: {e}"))),
        }
    }

    /// Offers saved sampler weights to the fleet (when there is one). The save itself stands
    /// when the store is away (this server samples them; others answer that they have none), so
    /// a broker's restart never fails a client's RL loop; the log says what was not shared.
    pub(crate) fn share(&self, path: &str, dir: &std::path::Path) {
        if let Some(store) = &self.config.weight_store {
            if let Err(e) = store.publish(path, dir) {
                tracing::warn!(path, error = %e, "sampler weights saved here but not shared with the fleet");
            }
        }
    }

    pub fn create_sampler(
        &self,
        session: &str,
        model_path: Option<String>,
        base_model: Option<String>,
    ) -> Result<String> {
        self.check_session(session)?;
        let weights = match &model_path {
            Some(p) => Some(self.version_for(p)?),
            None => {
                self.check_base(base_model.as_deref().unwrap_or(""))?;
                None
            }
        };
        Ok(self.add_sampler(Sampler {
            session: Some(session.to_string()),
            base_model: self.base_name.clone(),
            model_path,
            weights,
        }))
    }

    fn add_sampler(&self, s: Sampler) -> String {
        let id = format!("sampler-{}-{:08x}", self.unique(), rand::random::<u32>());
        self.samplers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id.clone(), Arc::new(s));
        id
    }

    pub fn sampler(&self, id: &str) -> Result<Arc<Sampler>> {
        self.samplers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(id).ok_or_else(|| {
            Failure::user(format!(
                "unknown sampling_session_id `{id}` (samplers unused for --session-timeout, or beyond the \
                 --max-samplers most recently used, are dropped)"
            ))
        })
    }
}
