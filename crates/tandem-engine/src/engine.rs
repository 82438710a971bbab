//! The engine loop and its handle.
use crate::commit::{commit, StepReport};
use crate::online::{OnlineHooks, OnlineState, Trace, TraceVersion, Version};
use crate::runner::{ModelRunner, ServedDrafter};
use crate::scheduler::{RequestInfo, Scheduler, SchedulingPolicy, Service, StepPlan};
use crate::spec_stats::{SpecCounters, SpecStats, SpecUsage, StepTime};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tandem_models::{KvCache, KvUsage, Model};
use tandem_runtime::speculative::{Drafter, EagleWeights, TrainableDrafter};
use tandem_runtime::{FinishReason, SampledToken, SamplingParams};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences served at once.
    pub max_batch: usize,
    /// Longest sequence, prompt plus output.
    pub max_seq_len: usize,
    /// Tokens the KV cache holds over all sequences (in blocks of `BLOCK`); sequences take
    /// blocks as they grow, and when the next steps do not fit, one is preempted. None: enough
    /// for `max_batch` sequences of `max_seq_len`. At least one sequence of `max_seq_len`.
    pub kv_tokens: Option<usize>,
    /// Sequences start on cached KV blocks of earlier ones with the same tokens and weights
    /// (prompt caching): those tokens are neither computed nor charged again.
    pub prefix_cache: bool,
    /// Tokens fed per forward (decodes first, prompt chunks fill the rest). The CPU kernels'
    /// results do not depend on batch composition, so any budget keeps a request's output the
    /// same whether it is served alone or with others; a larger one prefills faster, a smaller one
    /// keeps decode steps short while long prompts are being read.
    pub step_token_budget: usize,
    /// Requests that may wait for a slot; beyond that, submissions are refused.
    pub max_waiting: usize,
    /// Most draft tokens verified per sequence per step when a drafter is set (0 turns it off).
    pub spec_k: usize,
    /// Adapt each sequence's draft length to its acceptance: +2 after a fully accepted draft, -1
    /// (down to 1) after a rejection, so drafts that keep failing stay cheap to verify.
    pub spec_adaptive: bool,
    /// Greedy requests: at most this many of the drafter's runners-up, at any draft positions,
    /// are verified beside the draft in the same forward (`Draft::alternatives`: a draft tree),
    /// so a wrong guess where the drafter was unsure can still yield a token more. Each costs one
    /// more row in the verification forward.
    pub spec_alternatives: usize,
    /// Host memory for the KV of preempted requests (swapped out, restored when they resume);
    /// beyond it a preempted request is recomputed instead. None: as much as the KV cache itself.
    pub swap_bytes: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 8,
            max_seq_len: 2048,
            kv_tokens: None,
            prefix_cache: true,
            step_token_budget: 64,
            max_waiting: 256,
            spec_k: 4,
            spec_adaptive: true,
            spec_alternatives: 2,
            swap_bytes: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops at these tokens, which are not returned.
    pub stop_token_ids: Vec<u32>,
    /// Who sent it, for scheduling fairness (None: the shared "default" client).
    pub client: Option<String>,
    /// The agent (a bundle of calls) within the client, if any: fairness then counts the agent.
    pub agent: Option<String>,
    /// Weights other than the engine's own (a version a trainer saved for sampling); None: the
    /// served model. Such sequences are batched with all others, one forward per version.
    pub weights: Option<WeightVersion>,
    /// Score the prompt's tail instead of generating (None: generate).
    pub score: Option<ScoreSpec>,
}

/// Scoring instead of generating (a continuation's confidence, a prompt's logprobs): for every
/// prompt token from `from` on, its logprob given the tokens before it and the `top_k` most
/// likely tokens in its place, all read from the one prefill (`Event::Scored`). Nothing is
/// generated; the prompt is charged like any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreSpec {
    pub from: usize,
    pub top_k: usize,
}

/// Most alternatives a score reports per position.
pub const MAX_SCORE_TOP_K: usize = 100;

/// One scored prompt token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScore {
    pub token: u32,
    /// log p(token | the tokens before it).
    pub logprob: f32,
    /// The most likely tokens in its place with their logprobs, largest first (`top_k` of them).
    pub top: Vec<(u32, f32)>,
}

impl TokenScore {
    /// Mean logprob of the top entries: Squeeze Evolve's per-token confidence is its negation.
    pub fn top_mean(&self) -> f32 {
        self.top.iter().map(|t| t.1).sum::<f32>() / self.top.len().max(1) as f32
    }
}

/// A numbered set of weights to sample from. Versions of one base share its tensors; KV is never
/// shared between versions (each sequence computes its own under its version's weights).
#[derive(Clone)]
pub struct WeightVersion {
    /// Unique per engine, increasing: a later version of a family has a larger id.
    pub id: u64,
    /// The training run the version belongs to (the Tinker model id): its versions are one
    /// policy drifting, so they share a draft shape controller and their traces age together.
    pub family: Arc<str>,
    pub model: Arc<Model>,
}

impl std::fmt::Debug for WeightVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightVersion({} of {})", self.id, self.family)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens found in the KV cache when the request started (not computed).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Set when a drafter served the request.
    pub speculation: Option<SpecUsage>,
}

/// What a request's channel carries, in order: tokens, then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(SampledToken),
    /// Scores of the next scored prompt positions, in order (scoring requests only).
    Scored(Vec<TokenScore>),
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Failed(String),
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens but the context holds {limit} (including at least one generated token)")]
    PromptTooLong { prompt: usize, limit: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A sampling parameter out of range (`SamplingParams::validate`, the one rule for every API).
    #[error("{message}")]
    InvalidParam { param: &'static str, message: String },
    #[error("too many requests are waiting ({0}); retry later")]
    QueueFull(usize),
    #[error("the engine is shutting down")]
    ShuttingDown,
}

pub(crate) enum Command {
    // Boxed: a request is far larger than the other commands.
    Submit {
        request: Box<GenerationRequest>,
        events: UnboundedSender<Event>,
    },
    /// Training work of a client enters the policy, is charged, or leaves (`training::TrainingTurn`).
    Training {
        info: RequestInfo,
        event: TrainingEvent,
    },
    /// An operator's control of the engine (`Control`), answered when done.
    Control {
        op: Control,
        done: std::sync::mpsc::Sender<usize>,
    },
    Shutdown,
}

/// What an operator (or a router in front of a fleet) asks of a running engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop running steps: running sequences keep their KV and place, new requests queue (an RL
    /// loop pauses generation around a weight update). Answers 1.
    Pause,
    /// Run steps again. Answers 1.
    Resume,
    /// Forget every cached prefix (blocks no sequence holds are freed; held ones are no longer
    /// offered to new prompts). Answers the cached blocks freed.
    FlushCache,
}

pub(crate) enum TrainingEvent {
    /// Enters the policy; `grant` is answered when the policy lets it run, with whether it shares
    /// the machine with other clients' serving (`TrainingTurn::shared`).
    Begin(std::sync::mpsc::Sender<bool>),
    Charge {
        tokens: usize,
        backward: bool,
    },
    End,
}

/// A cheap handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    policy_name: &'static str,
    commands: UnboundedSender<Command>,
    shared: Arc<Shared>,
    config: EngineConfig,
    vocab_size: usize,
}

/// Service per client or agent, and requests waiting per client.
#[derive(Default)]
struct Scheduling {
    service: Vec<Service>,
    waiting_by_client: Vec<(String, usize)>,
    kv: KvUsage,
}

/// Counters the engine publishes for metrics and admission control.
#[derive(Default)]
struct Shared {
    waiting: AtomicUsize,
    running: AtomicUsize,
    shutting_down: AtomicBool,
    paused: AtomicBool,
    spec: SpecCounters,
    /// Scheduling figures as of the last step.
    scheduling: std::sync::Mutex<Scheduling>,
    preemptions: AtomicUsize,
}

impl EngineHandle {
    /// Queues a request; its events arrive on the returned channel. Drop the receiver to cancel.
    pub fn submit(&self, request: GenerationRequest) -> Result<UnboundedReceiver<Event>, EngineError> {
        if self.shared.shutting_down.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        self.validate(&request)?;
        let waiting = self.shared.waiting.load(Ordering::SeqCst);
        if waiting >= self.config.max_waiting {
            return Err(EngineError::QueueFull(waiting));
        }
        let (tx, rx) = unbounded_channel();
        self.commands
            .send(Command::Submit { request: Box::new(request), events: tx })
            .map_err(|_| EngineError::ShuttingDown)?;
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        Ok(rx)
    }

    /// The one check of a request against the engine's limits (every API calls it, through
    /// `submit` or before queuing several samples): a prompt that fits the context with room for
    /// one generated token, token ids in the vocabulary, sampling parameters in range.
    pub fn validate(&self, request: &GenerationRequest) -> Result<(), EngineError> {
        if request.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if request.prompt.len() >= self.config.max_seq_len {
            return Err(EngineError::PromptTooLong { prompt: request.prompt.len(), limit: self.config.max_seq_len });
        }
        if let Some(&bad) = request.prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(EngineError::Invalid(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.vocab_size
            )));
        }
        if let Some((id, _)) = request.sampling.logit_bias.iter().find(|(id, _)| *id as usize >= self.vocab_size) {
            return Err(EngineError::InvalidParam {
                param: "logit_bias",
                message: format!("`logit_bias` names token {id}; the vocabulary has {}", self.vocab_size),
            });
        }
        if let Some(score) = request.score {
            if score.from == 0 || score.from >= request.prompt.len() {
                return Err(EngineError::Invalid(format!(
                    "scoring starts at token {} of a {}-token prompt: it must be 1 or more (the first token has nothing before it) and leave a token to score",
                    score.from,
                    request.prompt.len()
                )));
            }
            if score.top_k > MAX_SCORE_TOP_K {
                return Err(EngineError::InvalidParam {
                    param: "top_k",
                    message: format!(
                        "scores report at most {MAX_SCORE_TOP_K} alternatives, {} were asked",
                        score.top_k
                    ),
                });
            }
        }
        let invalid =
            |e: tandem_runtime::InvalidParam| EngineError::InvalidParam { param: e.param, message: e.message };
        request.sampling.validate().map_err(invalid)
    }

    /// True while the engine (its thread, or an in-thread `Engine`) is there to serve: false after
    /// it stopped (shutdown, or a crash) — `/health` then reports the server unhealthy.
    pub fn is_alive(&self) -> bool {
        !self.commands.is_closed()
    }

    /// Sends a command to the engine; false when it has stopped.
    pub(crate) fn send(&self, command: Command) -> bool {
        self.commands.send(command).is_ok()
    }

    /// Runs `op` on the engine thread (between steps) and returns its answer; None when the
    /// engine has stopped.
    pub fn control(&self, op: Control) -> Option<usize> {
        let (done, answer) = std::sync::mpsc::channel();
        self.commands.send(Command::Control { op, done }).ok()?;
        answer.recv().ok()
    }

    /// Whether generation is paused (`Control::Pause`).
    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    /// Stops accepting requests; the engine finishes those it has, then its thread ends.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let _ = self.commands.send(Command::Shutdown);
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::SeqCst)
    }

    /// Requests holding a slot.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Service received per client or agent (the scheduling policy's accounting).
    pub fn service(&self) -> Vec<Service> {
        self.shared.scheduling.lock().map(|s| s.service.clone()).unwrap_or_default()
    }

    /// Requests waiting, per client.
    pub fn waiting_by_client(&self) -> Vec<(String, usize)> {
        self.shared.scheduling.lock().map(|s| s.waiting_by_client.clone()).unwrap_or_default()
    }

    /// "fcfs" or "fair".
    pub fn policy_name(&self) -> &'static str {
        self.policy_name
    }

    /// Running requests preempted (to be recomputed later) so far.
    pub fn preemptions(&self) -> usize {
        self.shared.preemptions.load(Ordering::Relaxed)
    }

    /// The KV pool's blocks (held, cached) and prompt tokens found cached, as of the last step.
    pub fn kv_usage(&self) -> KvUsage {
        self.shared.scheduling.lock().map(|s| s.kv).unwrap_or_default()
    }

    /// Speculative decoding totals since start.
    pub fn spec_stats(&self) -> SpecStats {
        self.shared.spec.snapshot()
    }
}

pub struct Engine {
    config: EngineConfig,
    scheduler: Scheduler,
    runner: ModelRunner,
    online: Option<OnlineState>,
    /// The draft length and sibling budget the throughput controller chose for this step.
    step_shape: Option<(usize, usize)>,
    /// The drafter trainer just had a turn: the next step runs on caches it left cold and is not
    /// timed for the draft shape controller.
    after_turn: bool,
    commands: UnboundedReceiver<Command>,
    shared: Arc<Shared>,
    shutting_down: bool,
    /// Finished events of this step, sent once the step's accounting is published: a client that
    /// reads /metrics after its response then sees that response counted.
    finishing: Vec<(UnboundedSender<Event>, Event)>,
}

impl Engine {
    /// An engine over `model` serving up to `config.max_batch` sequences of `config.max_seq_len`
    /// tokens from a KV pool of `config.kv_tokens`.
    pub fn new(
        model: Model,
        config: EngineConfig,
        policy: Box<dyn SchedulingPolicy>,
    ) -> tandem_models::Result<(Engine, EngineHandle)> {
        let mut config = config;
        config.max_seq_len = config.max_seq_len.min(model.max_positions());
        config.max_batch = config.max_batch.max(1);
        config.step_token_budget = config.step_token_budget.max(1);
        let tokens = config.kv_tokens.unwrap_or(config.max_batch * config.max_seq_len).max(config.max_seq_len);
        let blocks = tokens.div_ceil(tandem_models::BLOCK);
        let cache = KvCache::with_blocks(&model.config, config.max_batch, config.max_seq_len, blocks, model.device())?;
        let (tx, rx) = unbounded_channel();
        let shared = Arc::new(Shared::default());
        let handle = EngineHandle {
            policy_name: policy.name(),
            commands: tx,
            shared: shared.clone(),
            config: config.clone(),
            vocab_size: model.config.vocab_size,
        };
        let engine = Engine {
            scheduler: Scheduler::new(config.clone(), policy),
            runner: ModelRunner { model, cache, drafter: None, hidden_layers: Vec::new() },
            config,
            online: None,
            step_shape: None,
            after_turn: false,
            commands: rx,
            shared,
            finishing: Vec::new(),
            shutting_down: false,
        };
        Ok((engine, handle))
    }

    /// Speculative decoding with `drafter`, up to `config.spec_k` tokens per sequence per step.
    pub fn with_drafter(self, drafter: Box<dyn Drafter>) -> tandem_models::Result<Self> {
        self.with_served_drafter(ServedDrafter::Fixed(drafter))
    }

    /// Speculative decoding with a drafter that online training can update (see `with_online`).
    pub fn with_trainable_drafter(
        self,
        drafter: Box<dyn TrainableDrafter<Weights = EagleWeights>>,
    ) -> tandem_models::Result<Self> {
        self.with_served_drafter(ServedDrafter::Trained(drafter))
    }

    pub fn with_served_drafter(mut self, mut drafter: ServedDrafter) -> tandem_models::Result<Self> {
        let d = drafter.get_mut();
        d.prepare(self.config.max_batch, self.config.max_seq_len)?;
        tracing::info!(drafter = d.name(), k = self.config.spec_k, "speculative decoding on");
        *self.shared.spec.drafter.lock().unwrap_or_else(|e| e.into_inner()) = Some(d.name());
        self.runner.hidden_layers = d.target_layers().to_vec();
        self.runner.drafter = Some(drafter);
        Ok(self)
    }

    /// Online training: record traces of every sequence into `hooks.traces`, take new drafter
    /// weights from `hooks.exchange` between steps (rolling back one that lowers acceptance), and
    /// choose the draft length by measured throughput. Needs a trainable drafter
    /// (`with_trainable_drafter`).
    pub fn with_online(mut self, hooks: OnlineHooks) -> tandem_models::Result<Self> {
        let initial = self.runner.trained_mut().map(|d| Version { number: 0, weights: d.served_weights() });
        if initial.is_none() {
            return Err(tandem_models::ModelError::Drafter(
                "online training needs a trainable drafter (EAGLE), set with with_trainable_drafter".into(),
            ));
        }
        if let Some(v) = &initial {
            hooks.exchange.set_reference(v.weights.clone());
        }
        if !self.runner.hidden_layers.is_empty() {
            // The last residual stream too, for the trainer's labels (see `Trace::final_hidden`).
            self.runner.hidden_layers.push(self.runner.model.config.num_layers - 1);
        }
        self.online = Some(OnlineState::new(hooks, self.config.spec_k, self.config.spec_alternatives, initial));
        Ok(self)
    }

    /// Ends an in-thread engine and hands its model back (benchmarks reuse one loaded model).
    pub fn into_model(self) -> Model {
        self.runner.model
    }

    /// Runs the engine on its own thread until shutdown (or until every handle is dropped).
    pub fn spawn(self) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || self.run())
            .expect("spawning the engine thread")
    }

    fn run(mut self) {
        loop {
            if self.scheduler.is_idle() || self.is_paused() {
                if self.shutting_down {
                    break;
                }
                // While nothing is served and no client's training runs, an online drafter
                // trainer may use the whole CPU.
                self.set_idle(!self.scheduler.training_running());
                let cmd = self.commands.blocking_recv();
                self.set_idle(false);
                match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                }
                if self.is_paused() {
                    continue;
                }
            }
            self.lend_trainer_a_turn();
            self.guarded_step();
        }
        tracing::info!("engine stopped");
    }

    /// A step whose panic (a bug outside the forward, which has its own guard) fails the
    /// running requests, not the server: they get an error, the KV cache starts afresh, waiting
    /// requests are served next.
    fn guarded_step(&mut self) {
        let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| self.step())) else { return };
        let message = format!("internal error: {}", crate::runner::panic_message(&panic));
        tracing::error!(error = %message, "engine step panicked; failing the running requests");
        for (events, finished) in self.finishing.drain(..) {
            let _ = events.send(finished);
        }
        self.fail_running(&message);
        self.publish();
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { request, events } => {
                self.scheduler.add(*request, events);
            }
            Command::Training { info, event } => self.scheduler.training(&info, event),
            Command::Control { op, done } => {
                let _ = done.send(self.control(op));
            }
            Command::Shutdown => self.shutting_down = true,
        }
    }

    fn control(&mut self, op: Control) -> usize {
        match op {
            Control::Pause | Control::Resume => {
                self.shared.paused.store(op == Control::Pause, Ordering::SeqCst);
                tracing::info!(
                    paused = op == Control::Pause,
                    "generation {}",
                    if op == Control::Pause { "paused" } else { "resumed" }
                );
                1
            }
            Control::FlushCache => {
                let freed = self.runner.cache.flush_prefixes();
                self.publish();
                tracing::info!(freed, "prefix cache flushed");
                freed
            }
        }
    }

    fn is_paused(&self) -> bool {
        // A paused engine still finishes shutting down.
        self.shared.paused.load(Ordering::SeqCst) && !self.shutting_down
    }

    /// One step: take commands, drop cancelled requests, take new drafter weights, admit, then
    /// schedule → execute → commit, and let online learning observe. False when nothing ran.
    pub fn step(&mut self) -> bool {
        while let Ok(cmd) = self.commands.try_recv() {
            self.handle(cmd);
        }
        let ended = self.scheduler.drop_cancelled(&mut self.runner);
        self.on_finished(ended);
        self.take_new_drafter();
        let trace = self.trace_maker();
        self.scheduler.admit(&mut self.runner, &trace);
        let worked = self.run_step();
        self.scheduler.grant_training();
        self.publish();
        for (events, finished) in self.finishing.drain(..) {
            let _ = events.send(finished);
        }
        self.check();
        worked
    }

    /// Schedules one batch under the token budget, runs it, commits it.
    fn run_step(&mut self) -> bool {
        if self.scheduler.running_len() == 0 {
            return false;
        }
        let started = Instant::now();
        let plan = self.schedule();
        if plan.seqs.is_empty() {
            return false;
        }
        let draft_nanos = started.elapsed().as_nanos() as u64;
        let verify_start = Instant::now();
        let out = match self.runner.execute(&plan) {
            Ok(out) => out,
            Err(message) => return self.fail(&plan, &message),
        };
        let forward_secs = verify_start.elapsed().as_secs_f64();
        let report = commit(&mut self.scheduler, &mut self.runner, &self.config, &plan, &out);
        self.scheduler.index_prefixes(&mut self.runner);
        if self.runner.drafter.is_some() {
            let nanos = verify_start.elapsed().as_nanos() as u64;
            self.shared.spec.add_step(&plan, &report, draft_nanos, nanos);
        }
        // The draft shape's cost ends here: recording traces below costs per token emitted
        // whatever the shape, and the controller's step-time model has no term for tokens emitted
        // (it would charge that cost to the rows, and so to longer drafts).
        let shape_secs = started.elapsed().as_secs_f64();
        if let Some(online) = self.online.as_mut() {
            let layers = self.runner.drafter().map_or(0, |d| d.target_layers().len());
            if let Some(back) = online.on_step(&mut self.scheduler.running, &plan, &report, &out, layers) {
                self.serve_drafter(back, "rollback");
            }
        }
        self.measure_shape(&plan, &report, shape_secs);
        let time = StepTime {
            total: started.elapsed().as_secs_f64(),
            drafting: draft_nanos as f64 * 1e-9,
            forward: forward_secs,
        };
        self.shared.spec.add_time(&plan, &report, time);
        let ended = self.scheduler.finish(report.finished, &mut self.runner);
        self.on_finished(ended);
        self.finishing.extend(report.finishing);
        true
    }

    /// Asks the drafter for the decoding sequences' drafts, then lays out the step.
    fn schedule(&mut self) -> StepPlan {
        self.step_shape = None;
        if self.runner.drafter.is_none() {
            return self.scheduler.plan(Vec::new());
        }
        // Online: one draft length for all, chosen by measured throughput (0 = speculation off)
        // by the controllers of the weight-version family most decoding sequences belong to.
        // The draft tree's sibling budget too, by the same measure.
        let scheduler = &self.scheduler;
        let global = self
            .online
            .as_mut()
            .filter(|o| o.hooks.config.k_by_throughput)
            .map(|o| o.choose(&scheduler.decode_family()));
        let (asks, cut) = self.scheduler.draft_asks(global);
        // A draft cut short by the output limit or the slot is not a step at the chosen k.
        self.step_shape = global.filter(|_| !cut);
        let drafts = self.runner.propose(&self.scheduler.running, &asks);
        self.scheduler.plan(drafts)
    }

    /// Decode-only steps measure the end-to-end speed of the draft shape used (steps with only
    /// copied drafts say nothing about the learned drafter's length, and a step that also
    /// finishes a prompt costs what the prompt costs).
    fn measure_shape(&mut self, plan: &StepPlan, report: &StepReport, step_secs: f64) {
        let catch_up = self.runner.drafter_mut().map_or((0.0, 0), |d| d.take_catch_up());
        let after_turn = std::mem::take(&mut self.after_turn);
        let (Some(online), Some(shape), true) =
            (self.online.as_mut(), self.step_shape, plan.decode_only() && !after_turn)
        else {
            return;
        };
        online.on_decode_step(shape, plan, report, step_secs, catch_up);
    }

    /// A new sequence's trace (online training), tagged with its weight version: the drafter
    /// serves every version, so it learns from all of them (the trainer favours a family's newest).
    fn trace_maker(&self) -> impl Fn(&GenerationRequest) -> Option<Trace> {
        let layers = self.runner.drafter().map_or(0, |d| d.target_layers().len());
        let feature_size = layers * self.runner.model.config.hidden_size;
        // Traces cost the engine thread ~0.1 ms a step (the target's top probabilities at every
        // kept position): only made where a buffer keeps them for a trainer.
        let online = self.online.as_ref().is_some_and(|o| o.hooks.traces.keeps_traces());
        let max_seq_len = self.config.max_seq_len;
        move |request| {
            // A scored prompt has no output for the drafter to learn.
            if !online || request.score.is_some() {
                return None;
            }
            let mut trace = Trace {
                prompt_len: request.prompt.len(),
                feature_size,
                version: request.weights.as_ref().map(|w| TraceVersion { family: w.family.clone(), id: w.id }),
                ..Default::default()
            };
            // Room for every position the request may reach, taken once: grown by doubling, the
            // features cost fresh pages and a copy at each growth (~1% of a learning engine's
            // time, docs/speculative-decoding.md).
            let positions = (request.prompt.len() + request.max_tokens).min(max_seq_len);
            trace.features.reserve_exact(positions * feature_size);
            Some(trace)
        }
    }

    /// Between steps: serve the newest published drafter weights, if any (an atomic exchange; no
    /// request is paused, and outputs cannot change since verification decides every token).
    fn take_new_drafter(&mut self) {
        if let Some(v) = self.online.as_mut().and_then(|o| o.take_new()) {
            self.serve_drafter(v, "new");
        }
    }

    fn serve_drafter(&mut self, v: Version, why: &str) {
        if let Some(drafter) = self.runner.trained_mut() {
            let start = std::time::Instant::now();
            match drafter.update(v.weights.clone()) {
                Ok(()) => {
                    tracing::debug!(version = v.number, why, ms = start.elapsed().as_secs_f64() * 1e3, "drafter served")
                }
                Err(e) => tracing::warn!(error = %e, version = v.number, why, "drafter weights refused"),
            }
        }
    }

    fn on_finished(&mut self, ended: Vec<crate::sequence::Sequence>) {
        if let Some(online) = self.online.as_ref() {
            online.on_finished(ended);
        }
    }

    /// On a saturated server the drafter trainer computes only in turns the engine lends it
    /// between steps, at its share of serving time (see `TrainerTurns`).
    fn lend_trainer_a_turn(&mut self) {
        if let Some(o) = &self.online {
            self.after_turn |= o.hooks.exchange.lend_turn().is_some();
        }
    }

    fn set_idle(&self, idle: bool) {
        if let Some(o) = &self.online {
            o.hooks.exchange.idle.set(idle);
        }
    }

    /// Runs steps until every request has finished (tests drive the engine this way).
    pub fn run_until_idle(&mut self) {
        while self.step() {}
    }

    fn publish(&self) {
        self.shared.waiting.store(self.scheduler.waiting_len(), Ordering::SeqCst);
        self.shared.running.store(self.scheduler.running_len(), Ordering::SeqCst);
        self.shared.preemptions.store(self.scheduler.preemptions(), Ordering::Relaxed);
        if let Ok(mut s) = self.shared.scheduling.lock() {
            *s = Scheduling {
                service: self.scheduler.policy().service(),
                waiting_by_client: self.scheduler.waiting_by_client(),
                kv: self.runner.cache.usage(),
            };
        }
    }

    /// A forward that failed fails the requests in it; the engine goes on.
    fn fail(&mut self, plan: &StepPlan, message: &str) -> bool {
        tracing::error!(error = message, "forward failed; failing its requests");
        let idx: Vec<usize> = plan.seqs.iter().map(|p| p.index).collect();
        for &i in &idx {
            let _ = self.scheduler.running[i].events.send(Event::Failed(message.to_string()));
        }
        let ended = self.scheduler.finish(idx, &mut self.runner);
        self.on_finished(ended);
        true
    }

    /// The scheduler's bookkeeping against the runner's cache. A broken rule is a bug: the
    /// running requests fail with an error and their slots are emptied, and serving goes on.
    fn check(&mut self) {
        let cache = &self.runner.cache;
        let checked =
            self.scheduler.check(&|slot| cache.len(slot)).and_then(|_| cache.check().map_err(|e| e.to_string()));
        let Err(broken) = checked else { return };
        tracing::error!(error = %broken, "engine invariant broken; failing the running requests");
        self.fail_running(&format!("internal error: {broken}"));
    }

    /// Fails every running request with `message` and empties the KV cache and the slots (the
    /// cache first: its books may be what broke).
    fn fail_running(&mut self, message: &str) {
        for s in &self.scheduler.running {
            let _ = s.events.send(Event::Failed(message.to_string()));
        }
        self.runner.cache.clear();
        let ended = self.scheduler.reset(&mut self.runner);
        self.on_finished(ended);
    }
}
