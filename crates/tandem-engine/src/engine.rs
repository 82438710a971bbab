//! The engine loop and its handle.
use crate::online::{OnlineHooks, OnlineState, Rejection, Trace, Version};
use crate::scheduler::{RequestInfo, SchedulingPolicy, Service};
use crate::spec_stats::{SpecCounters, SpecStats, SpecUsage};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tandem_models::{KvCache, LogitsFor, Model, SequenceInput};
use tandem_runtime::spec::{verify, Draft, DraftRequest, Drafter};
use tandem_runtime::{FinishReason, SampledToken, Sampler, SamplingParams};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences served at once (one KV slot each).
    pub max_batch: usize,
    /// Longest sequence, prompt plus output, that a slot holds.
    pub max_seq_len: usize,
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
    /// Greedy requests: this many of the drafter's runners-up for the first draft token are
    /// verified beside the draft in the same forward (`Draft::alternatives`), so a wrong first
    /// guess can still yield two tokens. Each costs one more row in the verification forward.
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
}

/// A numbered set of weights to sample from. Versions of one base share its tensors; KV is never
/// shared between versions (each sequence computes its own under its version's weights).
#[derive(Clone)]
pub struct WeightVersion {
    /// Unique per engine (the trainer numbers them).
    pub id: u64,
    pub model: Arc<Model>,
}

impl std::fmt::Debug for WeightVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightVersion({})", self.id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Set when a drafter served the request.
    pub speculation: Option<SpecUsage>,
}

/// What a request's channel carries, in order: tokens, then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(SampledToken),
    Finished { reason: FinishReason, usage: Usage },
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
    #[error("too many requests are waiting ({0}); retry later")]
    QueueFull(usize),
    #[error("the engine is shutting down")]
    ShuttingDown,
}

enum Command {
    Submit { request: GenerationRequest, events: UnboundedSender<Event> },
    Shutdown,
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
}

/// Counters the engine publishes for metrics and admission control.
#[derive(Default)]
struct Shared {
    waiting: AtomicUsize,
    running: AtomicUsize,
    shutting_down: AtomicBool,
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
        request.sampling.validate().map_err(EngineError::Invalid)?;
        let waiting = self.shared.waiting.load(Ordering::SeqCst);
        if waiting >= self.config.max_waiting {
            return Err(EngineError::QueueFull(waiting));
        }
        let (tx, rx) = unbounded_channel();
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        self.commands.send(Command::Submit { request, events: tx }).map_err(|_| EngineError::ShuttingDown)?;
        Ok(rx)
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

    /// Speculative decoding totals since start.
    pub fn spec_stats(&self) -> SpecStats {
        self.shared.spec.snapshot()
    }
}

/// A request waiting for a slot: new, or preempted with its progress kept for recomputation.
// The variants differ in size, but waiting requests are few and each lives long: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
enum Waiting {
    New { info: RequestInfo, request: GenerationRequest, events: UnboundedSender<Event> },
    Preempted(Running),
}

impl Waiting {
    fn info(&self) -> &RequestInfo {
        match self {
            Waiting::New { info, .. } => info,
            Waiting::Preempted(r) => &r.info,
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Waiting::New { events, .. } => events.is_closed(),
            Waiting::Preempted(r) => r.events.is_closed(),
        }
    }
}

struct Running {
    info: RequestInfo,
    /// Prompt tokens the policy has been charged for (recomputation after preemption is free).
    prompt_charged: usize,
    slot: usize,
    request: GenerationRequest,
    events: UnboundedSender<Event>,
    sampler: Sampler,
    /// Prompt and output so far (for the repetition penalty).
    history: Vec<u32>,
    generated: usize,
    /// The last sampled token, to be fed next step.
    pending: Option<u32>,
    spec: SpecUsage,
    /// This sequence's current draft length (see `EngineConfig::spec_adaptive`).
    draft_k: usize,
    /// The longest draft prompt lookup may copy for it (`DraftRequest::copy_k`): grows after a
    /// copy accepted whole, shrinks after a rejection, like `draft_k`.
    copy_k: usize,
    /// The KV of a preempted request, copied out while it waits.
    swapped: Option<tandem_models::KvSnapshot>,
    /// What the target did on this sequence, for the drafter's trainer (online training only).
    trace: Option<Trace>,
}

impl Running {
    /// Tokens that must be in the cache before the next decode: the prompt, or after a preemption
    /// everything but the pending token.
    fn prefill_target(&self) -> usize {
        match self.pending {
            Some(_) => self.history.len() - 1,
            None => self.request.prompt.len(),
        }
    }
}

/// One sequence's part of a step.
struct Planned {
    /// Index in `running`.
    index: usize,
    tokens: Vec<u32>,
    wants_logits: bool,
    /// Draft tokens fed after the pending token (empty for prompt chunks and plain decodes).
    draft: Draft,
    /// Cache length before this step.
    start: usize,
    /// Feeds a pending token (a decode), not a prompt chunk.
    decode: bool,
}

pub struct Engine {
    model: Model,
    cache: KvCache,
    config: EngineConfig,
    policy: Box<dyn SchedulingPolicy>,
    drafter: Option<Box<dyn Drafter>>,
    online: Option<OnlineState>,
    /// The draft length the throughput controller chose for this step.
    step_k: Option<usize>,
    waiting: Vec<Waiting>,
    running: Vec<Running>,
    free_slots: Vec<usize>,
    next_arrival: u64,
    commands: UnboundedReceiver<Command>,
    shared: Arc<Shared>,
    shutting_down: bool,
    /// Finished events of this step, sent once the step's accounting is published: a client that
    /// reads /metrics after its response then sees that response counted.
    finishing: Vec<(UnboundedSender<Event>, Event)>,
}

impl Engine {
    /// An engine over `model` with `config.max_batch` KV slots of `config.max_seq_len` tokens.
    pub fn new(
        model: Model,
        config: EngineConfig,
        policy: Box<dyn SchedulingPolicy>,
    ) -> tandem_models::Result<(Engine, EngineHandle)> {
        let mut config = config;
        config.max_seq_len = config.max_seq_len.min(model.max_positions());
        config.max_batch = config.max_batch.max(1);
        config.step_token_budget = config.step_token_budget.max(1);
        let cache = KvCache::new(&model.config, config.max_batch, config.max_seq_len, model.device())?;
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
            model,
            cache,
            free_slots: (0..config.max_batch).rev().collect(),
            config,
            policy,
            drafter: None,
            online: None,
            step_k: None,
            waiting: Vec::new(),
            running: Vec::new(),
            next_arrival: 0,
            commands: rx,
            shared,
            finishing: Vec::new(),
            shutting_down: false,
        };
        Ok((engine, handle))
    }

    /// Speculative decoding with `drafter`, up to `config.spec_k` tokens per sequence per step.
    pub fn with_drafter(mut self, mut drafter: Box<dyn Drafter>) -> tandem_models::Result<Self> {
        drafter.prepare(self.config.max_batch, self.config.max_seq_len)?;
        tracing::info!(drafter = drafter.name(), k = self.config.spec_k, "speculative decoding on");
        *self.shared.spec.drafter.lock().expect("not poisoned") = Some(drafter.name());
        self.drafter = Some(drafter);
        Ok(self)
    }

    /// Online training: record traces of every sequence into `hooks.traces`, take new drafter
    /// weights from `hooks.exchange` between steps (rolling back one that lowers acceptance), and
    /// choose the draft length by measured throughput. Needs a drafter with weights (EAGLE).
    pub fn with_online(mut self, hooks: OnlineHooks) -> tandem_models::Result<Self> {
        let initial =
            self.drafter.as_ref().and_then(|d| d.eagle()).map(|(_, w)| Version { number: 0, weights: w.clone() });
        if initial.is_none() {
            return Err(tandem_models::ModelError::Drafter("online training needs an EAGLE drafter".into()));
        }
        self.online = Some(OnlineState::new(hooks, self.config.spec_k, initial));
        Ok(self)
    }

    /// Ends an in-thread engine and hands its model back (benchmarks reuse one loaded model).
    pub fn into_model(self) -> Model {
        self.model
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
            if self.running.is_empty() && self.waiting.is_empty() {
                if self.shutting_down {
                    break;
                }
                // While nothing is served, an online trainer may use the whole CPU.
                self.set_idle(true);
                let cmd = self.commands.blocking_recv();
                self.set_idle(false);
                match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                }
            }
            self.step();
        }
        tracing::info!("engine stopped");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { request, events } => {
                let info = RequestInfo {
                    id: self.next_arrival,
                    client: request.client.clone().unwrap_or_else(|| "default".into()),
                    agent: request.agent.clone(),
                    prompt_tokens: request.prompt.len(),
                };
                self.next_arrival += 1;
                self.policy.on_arrival(&info);
                tracing::debug!(id = info.id, client = %info.client, "arrived");
                self.waiting.push(Waiting::New { info, request, events });
            }
            Command::Shutdown => self.shutting_down = true,
        }
    }

    /// One scheduling step and one forward. Returns false when there was nothing to do.
    pub fn step(&mut self) -> bool {
        while let Ok(cmd) = self.commands.try_recv() {
            self.handle(cmd);
        }
        self.drop_cancelled();
        self.take_new_drafter();
        self.admit();
        let worked = self.forward_once();
        self.publish();
        for (events, finished) in self.finishing.drain(..) {
            let _ = events.send(finished);
        }
        self.check_invariants();
        worked
    }

    /// Between steps: serve the newest published drafter weights, if any (an atomic exchange; no
    /// request is paused, and outputs cannot change since verification decides every token).
    fn take_new_drafter(&mut self) {
        let (Some(online), Some(drafter)) = (self.online.as_mut(), self.drafter.as_mut()) else { return };
        if let Some(v) = online.take_new() {
            if let Err(e) = drafter.update(v.weights.clone()) {
                tracing::warn!(error = %e, version = v.number, "new drafter weights refused");
            }
        }
    }

    fn set_idle(&self, idle: bool) {
        if let Some(o) = &self.online {
            o.hooks.exchange.set_idle(idle);
        }
    }

    /// Runs steps until every request has finished (tests drive the engine this way).
    pub fn run_until_idle(&mut self) {
        while self.step() {}
    }

    fn publish(&self) {
        self.shared.waiting.store(self.waiting.len(), Ordering::SeqCst);
        self.shared.running.store(self.running.len(), Ordering::SeqCst);
        let mut by_client = std::collections::BTreeMap::<String, usize>::new();
        for w in &self.waiting {
            *by_client.entry(w.info().client.clone()).or_default() += 1;
        }
        if let Ok(mut s) = self.shared.scheduling.lock() {
            *s = Scheduling { service: self.policy.service(), waiting_by_client: by_client.into_iter().collect() };
        }
    }

    /// Requests whose client has gone free their slot now.
    fn drop_cancelled(&mut self) {
        let policy = &mut self.policy;
        self.waiting.retain(|w| {
            let closed = w.is_closed();
            if closed {
                policy.on_finish(w.info());
            }
            !closed
        });
        let gone: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].events.is_closed()).collect();
        self.remove_running(gone);
    }

    /// Fills free slots in the policy's order; when none is free and someone waits, lets the
    /// policy preempt one running request (at most one per step, so the batch does not churn).
    fn admit(&mut self) {
        let mut preempted = false;
        while !self.waiting.is_empty() {
            if self.free_slots.is_empty() {
                if preempted {
                    break;
                }
                let running: Vec<RequestInfo> = self.running.iter().map(|r| r.info.clone()).collect();
                let waiting: Vec<RequestInfo> = self.waiting.iter().map(|w| w.info().clone()).collect();
                let Some(v) = self.policy.victim(&running, &waiting) else { break };
                let mut r = self.running.remove(v);
                // Swap the KV out if the budget allows (restoring is a copy); else recompute later.
                let budget = self.config.swap_bytes.unwrap_or_else(|| self.cache.bytes());
                let swapped_now: usize = self.swapped_bytes();
                match self.cache.snapshot(r.slot) {
                    Ok(snap) if swapped_now + snap.bytes() <= budget => r.swapped = Some(snap),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "KV swap-out failed; the request will be recomputed"),
                }
                self.release(r.slot);
                tracing::debug!(id = r.info.id, client = %r.info.client, swapped = r.swapped.is_some(), "preempted");
                self.shared.preemptions.fetch_add(1, Ordering::Relaxed);
                self.waiting.push(Waiting::Preempted(r));
                preempted = true;
                continue;
            }
            let infos: Vec<RequestInfo> = self.waiting.iter().map(|w| w.info().clone()).collect();
            let Some(i) = self.policy.pick(&infos) else { break };
            let slot = self.free_slots.pop().expect("a free slot");
            match self.waiting.remove(i) {
                Waiting::Preempted(mut r) => {
                    r.slot = slot;
                    if let Some(snap) = r.swapped.take() {
                        if let Err(e) = self.cache.restore(slot, &snap) {
                            tracing::warn!(error = %e, "KV restore failed; recomputing");
                            let _ = self.cache.reset(slot);
                        }
                    }
                    self.running.push(r);
                }
                Waiting::New { info, request, events } => {
                    tracing::debug!(id = info.id, client = %info.client, "admitted");
                    let sampler = Sampler::new(request.sampling.clone());
                    let history = request.prompt.clone();
                    let feature_size =
                        self.drafter.as_ref().map_or(0, |d| d.target_layers().len()) * self.model.config.hidden_size;
                    // Traces teach the drafter the served model: other weights' sequences are not recorded.
                    let trace = self.online.as_ref().filter(|_| request.weights.is_none()).map(|_| Trace {
                        prompt_len: request.prompt.len(),
                        feature_size,
                        ..Default::default()
                    });
                    self.running.push(Running {
                        info,
                        prompt_charged: 0,
                        slot,
                        request,
                        events,
                        sampler,
                        history,
                        generated: 0,
                        pending: None,
                        spec: SpecUsage::default(),
                        draft_k: self.config.spec_k,
                        copy_k: self.config.spec_k,
                        swapped: None,
                        trace,
                    });
                }
            }
        }
    }

    /// Host bytes held by swapped-out preempted requests.
    fn swapped_bytes(&self) -> usize {
        self.waiting
            .iter()
            .map(|w| match w {
                Waiting::Preempted(r) => r.swapped.as_ref().map_or(0, |s| s.bytes()),
                Waiting::New { .. } => 0,
            })
            .sum()
    }

    fn release(&mut self, slot: usize) {
        self.cache.reset(slot).expect("slot exists");
        if let Some(d) = self.drafter.as_mut() {
            d.release(slot);
        }
        self.free_slots.push(slot);
    }

    /// Asks the drafter for each decoding sequence's draft (empty where none is wanted or the
    /// drafter fails: a broken drafter slows serving down, it never fails a request).
    fn propose_drafts(&mut self) -> Vec<Draft> {
        let mut drafts = vec![Draft::default(); self.running.len()];
        let Some(drafter) = self.drafter.as_mut() else { return drafts };
        // Online: one draft length for all, chosen by measured throughput (0 = speculation off).
        let global_k = self.online.as_mut().filter(|o| o.hooks.config.k_by_throughput).map(|o| o.k.choose());
        let mut asks = Vec::new();
        let mut who = Vec::new();
        // A draft cut short by the output limit or the slot is not a step at the chosen k.
        let mut cut = false;
        for (i, r) in self.running.iter().enumerate() {
            // The drafter predicts the served model; other weight versions decode plainly.
            if r.pending.is_none() || self.cache.len(r.slot) != r.prefill_target() || r.request.weights.is_some() {
                continue;
            }
            // Drafts never run past the output limit or the slot: at most k + 1 tokens are emitted.
            let remaining = r.request.max_tokens - r.generated;
            let room = self.config.max_seq_len.saturating_sub(self.cache.len(r.slot) + 1);
            let limit = self.config.spec_k.min(remaining.saturating_sub(1)).min(room);
            let k = global_k.unwrap_or(r.draft_k).min(limit);
            cut |= global_k.is_some_and(|g| k < g);
            // Copies are free to propose: asked for even while the learned drafter is off (k = 0).
            let copy_k = r.copy_k.min(limit);
            // Siblings of the first draft token need a first token, greedy verification, and
            // cache rows of their own after the draft's.
            let alternatives = match (k > 0, r.request.sampling.temperature == 0.0) {
                (true, true) => self.config.spec_alternatives.min(room - k),
                _ => 0,
            };
            if k > 0 || copy_k > 0 {
                asks.push(DraftRequest {
                    slot: r.slot,
                    tokens: &r.history,
                    k,
                    copy_k,
                    alternatives,
                    sampling: &r.request.sampling,
                });
                who.push((i, k, copy_k, alternatives));
            }
        }
        self.step_k = global_k.filter(|_| !cut);
        if asks.is_empty() {
            return drafts;
        }
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| drafter.propose(&self.model, &asks)));
        match result {
            Ok(Ok(proposed)) => {
                let vocab = self.model.config.vocab_size as u32;
                for ((i, k, copy_k, alternatives), mut d) in who.into_iter().zip(proposed) {
                    // Whatever the drafter says, verify only what fits and exists.
                    let most = if d.lookup { copy_k } else { k };
                    let valid = d.tokens.iter().take(most).take_while(|&&t| t < vocab).count();
                    d.tokens.truncate(valid);
                    // Siblings only of a learned greedy draft's first token, as many as were asked.
                    let first = d.tokens.first().copied();
                    let room = if d.lookup || d.probs.is_some() || first.is_none() { 0 } else { alternatives };
                    d.alternatives.truncate(room);
                    d.alternatives.retain(|&t| t < vocab && Some(t) != first);
                    if let Some(p) = d.probs.as_mut() {
                        if p.len() < valid {
                            d.tokens.truncate(p.len());
                        }
                        p.truncate(d.tokens.len());
                    }
                    drafts[i] = d;
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "drafter failed; decoding without drafts this step"),
            Err(_) => tracing::warn!("drafter panicked; decoding without drafts this step"),
        }
        drafts
    }

    /// Builds one batch under the token budget, runs it, samples or verifies, and sends events.
    fn forward_once(&mut self) -> bool {
        if self.running.is_empty() {
            return false;
        }
        let draft_start = Instant::now();
        self.step_k = None;
        let mut drafts = self.propose_drafts();
        let draft_nanos = draft_start.elapsed().as_nanos() as u64;
        let verify_start = Instant::now();
        // Which tokens each running sequence feeds this step: decodes first (the pending token and
        // its draft), then prompt chunks with what is left of the budget.
        let mut plan: Vec<Planned> = Vec::new();
        let mut budget = self.config.step_token_budget;
        for (i, r) in self.running.iter().enumerate() {
            if let Some(t) = r.pending.filter(|_| self.cache.len(r.slot) == r.prefill_target()) {
                let draft = std::mem::take(&mut drafts[i]);
                let mut tokens = vec![t];
                tokens.extend_from_slice(&draft.tokens);
                tokens.extend_from_slice(&draft.alternatives);
                budget = budget.saturating_sub(tokens.len());
                plan.push(Planned {
                    index: i,
                    tokens,
                    wants_logits: true,
                    draft,
                    start: self.cache.len(r.slot),
                    decode: true,
                });
            }
        }
        // Prompt chunks in the policy's order (the least-served client's first under fair).
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        let policy = &self.policy;
        let running = &self.running;
        order.sort_by(|&a, &b| {
            let (a, b) = (&running[a].info, &running[b].info);
            policy.rank(a).total_cmp(&policy.rank(b)).then(a.id.cmp(&b.id))
        });
        for i in order {
            let r = &self.running[i];
            let computed = self.cache.len(r.slot);
            if computed == r.prefill_target() || budget == 0 {
                continue;
            }
            // The prompt, or after a preemption the whole sequence but the pending token.
            let rest = &r.history[computed..r.prefill_target()];
            let n = rest.len().min(budget);
            budget -= n;
            plan.push(Planned {
                index: i,
                tokens: rest[..n].to_vec(),
                wants_logits: n == rest.len() && r.pending.is_none(),
                draft: Draft::default(),
                start: computed,
                decode: false,
            });
        }
        if plan.is_empty() {
            return false;
        }
        // Sequences of one weight version are contiguous: one forward each.
        plan.sort_by_key(|p| self.running[p.index].request.weights.as_ref().map_or(0, |w| w.id + 1));
        let batch: Vec<SequenceInput> = plan
            .iter()
            .map(|p| SequenceInput {
                slot: self.running[p.index].slot,
                tokens: &p.tokens,
                logits: match (p.wants_logits, p.draft.tokens.is_empty()) {
                    (false, _) => LogitsFor::None,
                    (true, true) => LogitsFor::Last,
                    (true, false) => LogitsFor::All,
                },
                siblings: p.draft.alternatives.len(),
            })
            .collect();
        let mut layers: Vec<usize> = self.drafter.as_ref().map(|d| d.target_layers().to_vec()).unwrap_or_default();
        if self.online.is_some() && !layers.is_empty() {
            // The last residual stream too, for the trainer's labels (see `Trace::final_hidden`).
            layers.push(self.model.config.num_layers - 1);
        }
        let versions: Vec<Option<&WeightVersion>> =
            plan.iter().map(|p| self.running[p.index].request.weights.as_ref()).collect();
        let (model, cache) = (&self.model, &mut self.cache);
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| forward_versions(model, &versions, &batch, cache, &layers)));
        let out = match result {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return self.fail_batch(&plan, &e.to_string()),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                return self.fail_batch(&plan, &format!("internal error: {}", msg.unwrap_or_else(|| "panic".into())));
            }
        };
        let logits = match out.logits.to_vec2::<f32>() {
            Ok(l) => l,
            Err(e) => return self.fail_batch(&plan, &e.to_string()),
        };
        let spec_on = self.drafter.is_some();
        let (mut drafted, mut accepted_total, mut steps, mut emitted_total) = (0u64, 0u64, 0u64, 0u64);
        let (mut lookup_drafted, mut lookup_accepted) = (0u64, 0u64);
        let (mut alternatives_drafted, mut alternatives_accepted) = (0u64, 0u64);
        let mut finished = Vec::new();
        let mut row_offset = 0;
        for (p, rows) in plan.iter().zip(&out.logit_rows) {
            let offset = row_offset;
            row_offset += p.tokens.len();
            let slot = self.running[p.index].slot;
            let is_decode = p.decode;
            if !is_decode {
                // Prompt tokens are charged once, when first computed.
                let r = &mut self.running[p.index];
                let upto = (p.start + p.tokens.len()).min(r.request.prompt.len());
                if upto > r.prompt_charged {
                    self.policy.charge(&r.info, upto - r.prompt_charged, 0);
                    r.prompt_charged = upto;
                }
            }
            if !p.wants_logits {
                self.observe(p.index, p.start, offset, p.tokens.len(), &out.hidden);
                continue;
            }
            let r = &mut self.running[p.index];
            let (emitted, accepted, alternative) = if p.draft.tokens.is_empty() {
                (vec![r.sampler.sample(&logits[rows.start], &r.history)], 0, None)
            } else {
                let rows: Vec<&[f32]> = logits[rows.clone()].iter().map(|l| l.as_slice()).collect();
                let v = verify(&mut r.sampler, &rows, &p.draft, &r.history);
                (v.tokens, v.accepted, v.alternative)
            };
            // Keep the pending token and the accepted drafts; rejected ones are rolled back. An
            // accepted sibling's keys and values move into the place of the draft's first token.
            let kept = if is_decode { 1 + accepted } else { p.tokens.len() };
            // Where each kept position's row is in this step's batch (a sibling's is not next).
            let k = p.draft.tokens.len();
            let row_of = |i: usize| match (i, alternative) {
                (1, Some(j)) => 1 + k + j,
                _ => i,
            };
            if let Some(j) = alternative {
                if let Err(e) = self.cache.move_position(slot, p.start + 1 + k + j, p.start + 1) {
                    tracing::error!(error = %e, "KV move of an accepted sibling failed");
                }
            } else if kept < p.tokens.len() {
                if let Err(e) = self.cache.truncate(slot, p.start + kept) {
                    tracing::error!(error = %e, "KV rollback failed");
                }
            }
            if is_decode && spec_on {
                let r = &mut self.running[p.index];
                r.spec.drafted_tokens += p.draft.tokens.len();
                alternatives_drafted += p.draft.alternatives.len() as u64;
                alternatives_accepted += alternative.is_some() as u64;
                r.spec.accepted_tokens += accepted;
                r.spec.decode_steps += 1;
                let all_in = accepted == p.draft.tokens.len();
                if p.draft.lookup {
                    r.copy_k =
                        if all_in { (r.copy_k + 2).min(self.config.spec_k) } else { r.copy_k.saturating_sub(1).max(1) };
                } else if self.config.spec_adaptive && !p.draft.tokens.is_empty() {
                    r.draft_k = if all_in {
                        (r.draft_k + 2).min(self.config.spec_k)
                    } else {
                        r.draft_k.saturating_sub(1).max(1)
                    };
                }
                drafted += p.draft.tokens.len() as u64;
                accepted_total += accepted as u64;
                if p.draft.lookup {
                    lookup_drafted += p.draft.tokens.len() as u64;
                    lookup_accepted += accepted as u64;
                }
                steps += 1;
                emitted_total += emitted.len() as u64;
            }
            if let (Some(online), Some(trace)) = (self.online.as_mut(), self.running[p.index].trace.as_mut()) {
                // The target's distribution at every committed position that has logits, and the
                // first rejected draft token (later ones were never judged).
                let top = online.hooks.config.trace_top;
                // Logit rows are the last rows.len() of the fed tokens.
                let first = p.start + p.tokens.len() - rows.len();
                for j in 0..rows.len() {
                    if first + j < p.start + kept {
                        trace.record_soft(first + j, &logits[rows.start + row_of(j)], top);
                    }
                }
                // Copied (prompt-lookup) drafts say nothing about the learned drafter. Where a
                // sibling won, the draft's first token was the one rejected.
                let learned = !p.draft.lookup;
                let judged = if alternative.is_some() { 0 } else { accepted };
                if is_decode && learned && judged < p.draft.tokens.len() {
                    trace.rejected.push(Rejection {
                        pos: p.start + judged,
                        token: p.draft.tokens[judged],
                        depth: judged,
                    });
                }
                if is_decode && learned && !p.draft.tokens.is_empty() {
                    if let Some(back) = online.record_draft(accepted > 0) {
                        if let Some(d) = self.drafter.as_mut() {
                            if let Err(e) = d.update(back.weights) {
                                tracing::error!(error = %e, "rollback failed");
                            }
                        }
                    }
                }
            }
            match alternative {
                Some(_) => {
                    self.observe(p.index, p.start, offset, 1, &out.hidden);
                    self.observe(p.index, p.start + 1, offset + row_of(1), 1, &out.hidden);
                }
                None => self.observe(p.index, p.start, offset, kept, &out.hidden),
            }
            let r = &mut self.running[p.index];
            let spec = spec_on.then_some(r.spec);
            let usage = |generated| Usage {
                prompt_tokens: r.request.prompt.len(),
                completion_tokens: generated,
                speculation: spec,
            };
            let count = emitted.len();
            let generated_before = r.generated;
            for (j, token) in emitted.into_iter().enumerate() {
                if r.request.stop_token_ids.contains(&token.id) {
                    self.finishing.push((
                        r.events.clone(),
                        Event::Finished { reason: FinishReason::Stop, usage: usage(r.generated) },
                    ));
                    finished.push(p.index);
                    break;
                }
                r.history.push(token.id);
                r.generated += 1;
                let id = token.id;
                if r.events.send(Event::Token(token)).is_err() {
                    finished.push(p.index);
                    break;
                }
                // As plain decoding would judge it: the cache would hold p.start + 1 + j tokens
                // (p.start + kept for a prompt's first token) with this one pending.
                let cached = if is_decode { p.start + 1 + j } else { p.start + kept };
                let full = cached + 1 > self.config.max_seq_len;
                if r.generated >= r.request.max_tokens || full {
                    self.finishing.push((
                        r.events.clone(),
                        Event::Finished { reason: FinishReason::Length, usage: usage(r.generated) },
                    ));
                    finished.push(p.index);
                    break;
                }
                if j + 1 == count {
                    r.pending = Some(id);
                }
            }
            // Output is charged as it is emitted (speculative tokens only if they were accepted).
            self.policy.charge(&r.info, 0, r.generated - generated_before);
        }
        if spec_on {
            let c = &self.shared.spec;
            c.add(&c.drafted, drafted);
            c.add(&c.accepted, accepted_total);
            c.add(&c.decode_steps, steps);
            c.add(&c.emitted, emitted_total);
            c.add(&c.draft_nanos, draft_nanos);
            c.add(&c.lookup_drafted, lookup_drafted);
            c.add(&c.lookup_accepted, lookup_accepted);
            c.add(&c.alternatives_drafted, alternatives_drafted);
            c.add(&c.alternatives_accepted, alternatives_accepted);
            c.add(&c.verify_nanos, verify_start.elapsed().as_nanos() as u64);
        }
        // Decode-only steps measure the end-to-end speed of the draft length used (steps with
        // copied drafts say nothing about the learned drafter's length, and a step that also
        // finishes a prompt costs what the prompt costs). Judged from the plan: a prompt's last
        // chunk leaves its sequence with a pending token, like a decode.
        let decode_only = plan.iter().all(|p| p.decode && !p.draft.lookup);
        let catch_up = self.drafter.as_mut().map_or((0.0, 0), |d| d.take_catch_up());
        if let (Some(online), Some(k), true) = (self.online.as_mut(), self.step_k, decode_only) {
            // Steady drafting catches up about one position per emitted token; a backlog left by
            // steps without drafts is not this k's cost.
            let (secs, positions) = catch_up;
            let steady = secs / positions.max(1) as f64 * (emitted_total as f64).min(positions as f64);
            let step_secs = draft_start.elapsed().as_secs_f64() - secs + steady;
            online.k.record(k, emitted_total as usize, step_secs);
            online.hooks.exchange.chosen_k.store(online.k.best() as u64, Ordering::Relaxed);
            online.hooks.exchange.gain_bits.store(online.k.gain().to_bits(), Ordering::Relaxed);
            if let Ok(mut t) = online.hooks.exchange.k_table.try_lock() {
                *t = online.k.table();
            }
        }
        self.remove_running(finished);
        true
    }

    /// Hands the drafter the target's hidden states of `n` committed positions from `start`, which
    /// are rows `offset..offset + n` of this step's batch.
    fn observe(&mut self, index: usize, start: usize, offset: usize, n: usize, hidden: &[candle_core::Tensor]) {
        let Some(drafter) = self.drafter.as_mut() else { return };
        if hidden.is_empty() || n == 0 {
            return;
        }
        let slot = self.running[index].slot;
        // The drafter's layers, then (with online training) the last residual stream.
        let (hidden, last) = hidden.split_at(drafter.target_layers().len().min(hidden.len()));
        let rows: Result<Vec<_>, _> = hidden.iter().map(|h| h.narrow(0, offset, n)).collect();
        if let (Some(trace), Ok(rows)) = (self.running[index].trace.as_mut(), rows.as_ref()) {
            let floats = |t: candle_core::Result<candle_core::Tensor>| {
                t.and_then(|t| t.to_dtype(candle_core::DType::F32))
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
            };
            let joined = floats(candle_core::Tensor::cat(rows, 1));
            let last = last.first().map(|l| floats(l.narrow(0, offset, n))).transpose();
            match (joined, last) {
                (Ok(v), Ok(l)) => trace.record_features(start, &v, l.as_deref()),
                (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "trace capture failed"),
            }
        }
        let outcome =
            rows.map_err(tandem_models::ModelError::from).and_then(|rows| drafter.observe(slot, start, &rows));
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "drafter could not take hidden states");
        }
    }

    fn fail_batch(&mut self, plan: &[Planned], message: &str) -> bool {
        tracing::error!(error = message, "forward failed; failing its requests");
        let mut idx: Vec<usize> = plan.iter().map(|p| p.index).collect();
        for &i in &idx {
            let _ = self.running[i].events.send(Event::Failed(message.to_string()));
        }
        idx.sort_unstable();
        self.remove_running(idx);
        true
    }

    fn remove_running(&mut self, mut idx: Vec<usize>) {
        idx.sort_unstable();
        idx.dedup();
        for i in idx.into_iter().rev() {
            let mut r = self.running.remove(i);
            if let (Some(online), Some(trace)) = (self.online.as_ref(), r.trace.take()) {
                if trace.positions() >= 2 {
                    online.hooks.traces.push(Trace { tokens: std::mem::take(&mut r.history), ..trace });
                }
            }
            self.policy.on_finish(&r.info);
            self.release(r.slot);
        }
    }

    /// The bookkeeping the engine relies on; cheap, so every step checks it.
    fn check_invariants(&self) {
        let mut seen = vec![false; self.config.max_batch];
        for &s in &self.free_slots {
            assert!(!std::mem::replace(&mut seen[s], true), "slot {s} free twice");
            assert_eq!(self.cache.len(s), 0, "free slot {s} holds tokens");
        }
        for r in &self.running {
            assert!(!std::mem::replace(&mut seen[r.slot], true), "slot {} used twice", r.slot);
            let computed = self.cache.len(r.slot);
            assert!(computed <= r.prefill_target(), "slot {} is ahead of its tokens", r.slot);
            assert_eq!(r.history.len(), r.request.prompt.len() + r.generated);
            assert_eq!(r.pending.is_some(), r.generated > 0);
        }
        assert!(seen.iter().all(|&s| s), "a slot is lost");
    }
}

/// One forward per run of sequences that share weights (`versions[i]` belongs to `batch[i]`; runs
/// are contiguous), merged as if it were one: logits rows and hidden states in batch order.
fn forward_versions(
    base: &Model,
    versions: &[Option<&WeightVersion>],
    batch: &[SequenceInput],
    cache: &mut KvCache,
    layers: &[usize],
) -> tandem_models::Result<tandem_models::ForwardOutput> {
    let key = |v: &Option<&WeightVersion>| v.map(|w| w.id);
    if versions.iter().all(|v| key(v) == key(&versions[0])) {
        let model = versions[0].map_or(base, |w| w.model.as_ref());
        return model.forward(batch, cache, layers);
    }
    let mut logits = Vec::new();
    let mut logit_rows = Vec::new();
    let mut hidden: Vec<Vec<candle_core::Tensor>> = vec![Vec::new(); layers.len()];
    let mut rows_so_far = 0;
    let mut start = 0;
    while start < batch.len() {
        let mut end = start + 1;
        while end < batch.len() && key(&versions[end]) == key(&versions[start]) {
            end += 1;
        }
        let model = versions[start].map_or(base, |w| w.model.as_ref());
        let out = model.forward(&batch[start..end], cache, layers)?;
        logit_rows.extend(out.logit_rows.iter().map(|r| r.start + rows_so_far..r.end + rows_so_far));
        rows_so_far += out.logits.dim(0)?;
        logits.push(out.logits);
        for (h, t) in hidden.iter_mut().zip(out.hidden) {
            h.push(t);
        }
        start = end;
    }
    Ok(tandem_models::ForwardOutput {
        logits: candle_core::Tensor::cat(&logits, 0)?,
        logit_rows,
        hidden: hidden.iter().map(|h| candle_core::Tensor::cat(h, 0)).collect::<candle_core::Result<_>>()?,
    })
}
