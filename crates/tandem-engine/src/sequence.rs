//! A request's state inside the engine: waiting for a slot, or running in one.
use crate::engine::{Event, GenerationRequest};
use crate::online::Trace;
use crate::scheduler::RequestInfo;
use crate::spec_stats::SpecUsage;
use tandem_runtime::Sampler;
use tokio::sync::mpsc::UnboundedSender;

/// The longest copy prompt lookup makes for a new sequence: a copy's tokens are right a third of
/// the time on the busy-server stream (each a row of the verification forward), so it starts
/// short and grows by two after each copy accepted whole, as draft lengths do.
pub const COPY_K_START: usize = 2;

/// What a running sequence does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Tokens it already has (the prompt, or after a recomputing preemption everything but the
    /// pending token) are still to be computed into its cache.
    Prefill,
    /// Its cache holds everything but the pending token: the next step feeds that token (and
    /// maybe a draft after it).
    Decode,
}

/// A request waiting for a slot: new, or preempted with its progress kept.
// The variants differ in size, but waiting requests are few and each lives long: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Waiting {
    New { info: RequestInfo, request: GenerationRequest, events: UnboundedSender<Event> },
    Preempted(Sequence),
}

impl Waiting {
    pub(crate) fn info(&self) -> &RequestInfo {
        match self {
            Waiting::New { info, .. } => info,
            Waiting::Preempted(s) => &s.info,
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Waiting::New { events, .. } => events.is_closed(),
            Waiting::Preempted(s) => s.events.is_closed(),
        }
    }

    /// Host bytes of the KV it holds swapped out.
    pub(crate) fn swapped_bytes(&self) -> usize {
        match self {
            Waiting::Preempted(s) => s.swapped.as_ref().map_or(0, |k| k.bytes()),
            Waiting::New { .. } => 0,
        }
    }
}

/// A request holding a KV slot.
pub(crate) struct Sequence {
    pub info: RequestInfo,
    /// Prompt tokens the policy has been charged for (recomputation after preemption is free).
    pub prompt_charged: usize,
    /// Prompt tokens found in the KV cache when it was admitted.
    pub cached: usize,
    pub slot: usize,
    /// Tokens in its KV cache (the scheduler's record; the runner's cache must agree).
    pub computed: usize,
    pub request: GenerationRequest,
    pub events: UnboundedSender<Event>,
    pub sampler: Sampler,
    /// Prompt and output so far (for the penalties, drafters and recomputation).
    pub history: Vec<u32>,
    pub generated: usize,
    /// The last sampled token, to be fed next step.
    pub pending: Option<u32>,
    pub spec: SpecUsage,
    /// This sequence's current draft length (see `EngineConfig::spec_adaptive`).
    pub draft_k: usize,
    /// The longest draft prompt lookup may copy for it (`DraftRequest::copy_k`): starts at
    /// `COPY_K_START`, grows after a copy accepted whole, shrinks after a rejection, like `draft_k`.
    pub copy_k: usize,
    /// The KV of a preempted request, copied out while it waits.
    pub swapped: Option<tandem_models::KvSnapshot>,
    /// What the target did on this sequence, for the drafter's trainer (online training only).
    pub trace: Option<Trace>,
    /// A scoring request: the next prompt position to score (positions before it were reported).
    pub scored: usize,
}

impl Sequence {
    pub(crate) fn new(
        info: RequestInfo,
        slot: usize,
        request: GenerationRequest,
        events: UnboundedSender<Event>,
        spec_k: usize,
        trace: Option<Trace>,
    ) -> Self {
        Sequence {
            info,
            prompt_charged: 0,
            cached: 0,
            slot,
            computed: 0,
            sampler: Sampler::new(request.sampling.clone())
                .after_prompt(request.prompt.len())
                .ending_with(request.stop_token_ids.clone()),
            history: request.prompt.clone(),
            request,
            events,
            generated: 0,
            pending: None,
            spec: SpecUsage::default(),
            draft_k: spec_k,
            copy_k: COPY_K_START.min(spec_k),
            swapped: None,
            trace,
            scored: 0,
        }
    }

    /// Tokens that must be in the cache before the next decode: the prompt, or after a preemption
    /// everything but the pending token.
    pub(crate) fn prefill_target(&self) -> usize {
        match self.pending {
            Some(_) => self.history.len() - 1,
            None => self.request.prompt.len(),
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.pending {
            Some(_) if self.computed == self.prefill_target() => Phase::Decode,
            _ => Phase::Prefill,
        }
    }
}
