//! The `Scheduler`: every request's state (waiting, running, free slots, each sequence's computed
//! length and pending token), the policy, and each step's `StepPlan`. No tensors: its tests drive
//! it with a fake model (see `tests.rs`), and the engine runs exactly this code.
//!
//! A step is planned in two halves because drafts take budget: `draft_asks` says which decoding
//! sequences may draft and how far, the runner proposes, and `plan` lays out the batch (decodes
//! with their drafts first, then prompt chunks in the policy's order under what is left).
use super::{RequestInfo, SchedulingPolicy};
use crate::engine::{EngineConfig, Event, GenerationRequest, TrainingEvent, WeightVersion};
use crate::online::{Family, Trace};
use crate::sequence::{Phase, Sequence, Waiting};
use tandem_models::{KvSnapshot, BLOCK};
use tandem_runtime::speculative::Draft;
use tokio::sync::mpsc::UnboundedSender;

/// What the scheduler asks of the KV cache when requests move in and out of slots (the model
/// runner; a fake in tests).
pub(crate) trait KvSlots {
    /// A copy of a slot's KV (for a preempted request), or None when it cannot be made.
    fn snapshot(&self, slot: usize) -> Option<KvSnapshot>;
    /// Puts a copy back; false when it fails (the request is then recomputed).
    fn restore(&mut self, slot: usize, snapshot: &KvSnapshot) -> bool;
    /// Empties a slot: its sequence ended or left it.
    fn release(&mut self, slot: usize);
    /// Bytes of the whole KV cache (the default budget for swapped-out KV).
    fn cache_bytes(&self) -> usize;
    /// Starts the empty `slot` on cached blocks that `tokens` begin with (computed with weights
    /// `salt`), holding at most `most` positions; returns the positions it holds.
    fn share_prefix(&mut self, slot: usize, tokens: &[u32], salt: u64, most: usize) -> usize;
    /// Offers `slot`'s full blocks, whose positions hold `tokens`, to later prompts.
    fn index_prefix(&mut self, slot: usize, tokens: &[u32], salt: u64);
    /// KV blocks that can be taken now.
    fn available_blocks(&self) -> usize;
    /// Blocks writing positions from..to of `slot` takes.
    fn blocks_to_write(&self, slot: usize, from: usize, to: usize) -> usize;
}

/// What a sequence's KV blocks are keyed by besides tokens: its weights (0: the served model).
/// Blocks computed under other weights are never shared.
pub(crate) fn kv_salt(request: &GenerationRequest) -> u64 {
    request.weights.as_ref().map_or(0, |w| w.id + 1)
}

/// A decoding sequence the drafter may propose for this step, with its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftAsk {
    /// Index in the running list.
    pub index: usize,
    /// Most learned draft tokens (0: none).
    pub k: usize,
    /// Most tokens copied by prompt lookup.
    pub copy_k: usize,
    /// Most siblings of draft tokens, over all positions (the draft tree's node budget).
    pub alternatives: usize,
}

/// One sequence's part of a step.
#[derive(Debug, Clone)]
pub struct Scheduled {
    /// Index in the running list.
    pub index: usize,
    pub slot: usize,
    /// Tokens in its cache before this step.
    pub start: usize,
    /// Tokens fed: a prompt chunk, or the pending token followed by the draft and its siblings.
    pub tokens: Vec<u32>,
    /// Logits wanted (for every fed token when there is a draft, else for the last).
    pub wants_logits: bool,
    /// Draft tokens fed after the pending token (empty for prompt chunks and plain decodes).
    pub draft: Draft,
    /// Feeds a pending token (a decode), not a prompt chunk.
    pub decode: bool,
    /// A chunk of a scoring request holding scored positions: logits for every fed token,
    /// turned into `TokenScore`s at commit (`wants_logits` is false: nothing is sampled).
    pub scores: bool,
    /// The weights it samples from (None: the served model).
    pub weights: Option<WeightVersion>,
}

/// What one step computes: sequences of one weight version are contiguous.
#[derive(Debug, Clone, Default)]
pub struct StepPlan {
    pub seqs: Vec<Scheduled>,
}

impl StepPlan {
    /// Every sequence decodes and some did not copy its draft: the step measures a draft length's
    /// speed. Copies are asked for at every length, so in a batch they weigh on every length
    /// alike; a step where all copied says nothing about the learned drafter. (Excluding every
    /// step with a copy starved the controller in batches, where some sequence nearly always
    /// copies: it never finished its first sweep and stayed at k = 0.)
    pub fn decode_only(&self) -> bool {
        self.seqs.iter().all(|s| s.decode) && self.seqs.iter().any(|s| !s.draft.lookup)
    }
}

pub struct Scheduler {
    config: EngineConfig,
    policy: Box<dyn SchedulingPolicy>,
    pub(crate) waiting: Vec<Waiting>,
    pub(crate) running: Vec<Sequence>,
    free_slots: Vec<usize>,
    next_arrival: u64,
    preemptions: usize,
    /// Training requests waiting for the policy's grant (see `crate::training`).
    training_waiting: Vec<(RequestInfo, std::sync::mpsc::Sender<bool>)>,
    /// Training requests granted and not yet ended: their work is on the cores.
    training_running: usize,
    /// When each entity's last request ended (kept for `RECENT_SERVING`).
    last_served: std::collections::BTreeMap<String, std::time::Instant>,
}

/// How long after its last request ended a client still counts as being served when a training
/// turn is granted: a chat client pausing between requests is still there, and a training pass
/// begun in its pause shares the cores with its next request.
pub const RECENT_SERVING: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether entities other than `me` are being served (`serving`) or were within RECENT_SERVING.
fn served_beside(
    me: &str,
    serving: &[String],
    last_served: &std::collections::BTreeMap<String, std::time::Instant>,
) -> bool {
    serving.iter().any(|e| e != me) || last_served.iter().any(|(e, t)| e != me && t.elapsed() < RECENT_SERVING)
}

impl Scheduler {
    pub fn new(config: EngineConfig, policy: Box<dyn SchedulingPolicy>) -> Self {
        Scheduler {
            free_slots: (0..config.max_batch).rev().collect(),
            config,
            policy,
            waiting: Vec::new(),
            running: Vec::new(),
            next_arrival: 0,
            preemptions: 0,
            training_waiting: Vec::new(),
            training_running: 0,
            last_served: std::collections::BTreeMap::new(),
        }
    }

    pub fn policy(&self) -> &dyn SchedulingPolicy {
        self.policy.as_ref()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Whether a client's training work (a granted turn) is running beside the engine.
    pub fn training_running(&self) -> bool {
        self.training_running > 0
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Running requests preempted so far.
    pub fn preemptions(&self) -> usize {
        self.preemptions
    }

    /// Entities (clients, or client/agent) with requests waiting or running.
    pub fn serving_entities(&self) -> Vec<String> {
        let waiting = self.waiting.iter().map(|w| w.info());
        let all: std::collections::BTreeSet<String> =
            waiting.chain(self.running.iter().map(|s| &s.info)).map(|i| i.entity()).collect();
        all.into_iter().collect()
    }

    /// Training work of `info`'s entity enters the policy (and waits for its grant), is charged,
    /// or leaves it. Commands arrive in order, so a turn's charge is counted before the next
    /// turn of the same thread is judged.
    pub(crate) fn training(&mut self, info: &RequestInfo, event: TrainingEvent) {
        match event {
            TrainingEvent::Begin(grant) => {
                self.policy.on_arrival(info);
                self.training_waiting.push((info.clone(), grant));
                self.grant_training();
            }
            TrainingEvent::Charge { tokens, backward: true } => self.policy.charge_training(info, tokens),
            TrainingEvent::Charge { tokens, backward: false } => self.policy.charge(info, tokens, 0),
            TrainingEvent::End => {
                self.training_running = self.training_running.saturating_sub(1);
                self.policy.on_finish(info)
            }
        }
    }

    /// Lets waiting training work run where the policy allows it (checked after every step, as
    /// serving's counters move).
    pub(crate) fn grant_training(&mut self) {
        if self.training_waiting.is_empty() {
            return;
        }
        let serving = self.serving_entities();
        let (policy, last_served) = (&self.policy, &self.last_served);
        let mut granted = 0;
        self.training_waiting.retain(|(info, grant)| {
            let me = info.entity();
            let run = policy.may_train(&me, &serving);
            if run {
                let _ = grant.send(served_beside(&me, &serving, last_served));
                granted += 1;
            }
            !run
        });
        self.training_running += granted;
    }

    /// Requests waiting, per client.
    pub fn waiting_by_client(&self) -> Vec<(String, usize)> {
        let mut by_client = std::collections::BTreeMap::<String, usize>::new();
        for w in &self.waiting {
            *by_client.entry(w.info().client.clone()).or_default() += 1;
        }
        by_client.into_iter().collect()
    }

    /// A new request starts waiting; returns its arrival number.
    pub(crate) fn add(&mut self, request: GenerationRequest, events: UnboundedSender<Event>) -> u64 {
        let id = self.next_arrival;
        let info = RequestInfo {
            id,
            client: request.client.clone().unwrap_or_else(|| "default".into()),
            agent: request.agent.clone(),
            prompt_tokens: request.prompt.len(),
        };
        self.next_arrival += 1;
        self.policy.on_arrival(&info);
        tracing::debug!(id = info.id, client = %info.client, "arrived");
        self.waiting.push(Waiting::New { info, request, events });
        id
    }

    /// Requests whose client has gone free their slot now; returns the running ones that ended.
    pub(crate) fn drop_cancelled(&mut self, kv: &mut dyn KvSlots) -> Vec<Sequence> {
        let policy = &mut self.policy;
        self.waiting.retain(|w| {
            let closed = w.is_closed();
            if closed {
                policy.on_finish(w.info());
            }
            !closed
        });
        let gone: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].events.is_closed()).collect();
        self.finish(gone, kv)
    }

    /// Fills free slots in the policy's order while the KV pool has room for each newcomer's
    /// prompt; when no slot is free, or the pool has no room, and someone waits, lets the policy
    /// preempt one running request (at most one per step, so the batch does not churn). First, if the running
    /// sequences' next steps no longer fit the pool, preempts until they do. `trace` makes a new
    /// sequence's trace (online training) or None.
    pub(crate) fn admit(&mut self, kv: &mut dyn KvSlots, trace: &dyn Fn(&GenerationRequest) -> Option<Trace>) {
        self.make_room(kv);
        let mut preempted = false;
        while !self.waiting.is_empty() {
            if self.free_slots.is_empty() {
                if preempted || !self.preempt(kv) {
                    break;
                }
                preempted = true;
                continue;
            }
            // Requests whose prompt starts like one being prefilled wait for its blocks.
            let ready: Vec<usize> =
                (0..self.waiting.len()).filter(|&i| !self.shares_a_prefill(&self.waiting[i])).collect();
            let infos: Vec<RequestInfo> = ready.iter().map(|&i| self.waiting[i].info().clone()).collect();
            let Some(i) = self.policy.pick(&infos).map(|i| ready[i]) else { break };
            let slot = self.free_slots.pop().expect("a free slot");
            let w = self.waiting.remove(i);
            match self.start(w, slot, kv, trace) {
                Ok(seq) => self.running.push(seq),
                Err(w) => {
                    // The pool cannot take it yet: it keeps its place, and the policy may
                    // preempt for it as for a slot (once per step); else it waits for sequences
                    // to end.
                    kv.release(slot);
                    self.free_slots.push(slot);
                    self.waiting.insert(i, w);
                    if preempted || !self.preempt(kv) {
                        break;
                    }
                    preempted = true;
                }
            }
        }
    }

    /// Puts a waiting request in `slot`: a new one, or a preempted one whose KV is restored or
    /// recomputed; either starts on whatever prefix of its tokens the cache holds. Gives the
    /// request back when the pool cannot also hold the rest of its prompt and its first decode.
    // The error is the request itself, handed back whole (as `Waiting` is, see there).
    #[allow(clippy::result_large_err)]
    fn start(
        &self,
        w: Waiting,
        slot: usize,
        kv: &mut dyn KvSlots,
        trace: &dyn Fn(&GenerationRequest) -> Option<Trace>,
    ) -> Result<Sequence, Waiting> {
        // The pool must hold `need` more blocks beside what the running sequences may take.
        let held = self.blocks_held_back(kv);
        let fits = |need: usize, kv: &dyn KvSlots| need + held <= kv.available_blocks();
        match w {
            Waiting::Preempted(mut s) => {
                s.slot = slot;
                if let Some(snap) = s.swapped.take() {
                    if !fits(kv.blocks_to_write(slot, 0, snap.len() + self.decode_rows()), kv) {
                        s.swapped = Some(snap);
                        return Err(Waiting::Preempted(s));
                    }
                    if kv.restore(slot, &snap) {
                        return Ok(s);
                    }
                    tracing::warn!("KV restore failed; recomputing");
                    kv.release(slot);
                }
                s.computed = self.shared_prefix(slot, &s, kv);
                match fits(self.blocks_needed(&s, kv), kv) {
                    true => Ok(s),
                    false => Err(Waiting::Preempted(s)),
                }
            }
            Waiting::New { info, request, events } => {
                let t = trace(&request);
                let mut s = Sequence::new(info, slot, request, events, self.config.spec_k, t);
                s.computed = self.shared_prefix(slot, &s, kv);
                if !fits(self.blocks_needed(&s, kv), kv) {
                    return Err(Waiting::New { info: s.info, request: s.request, events: s.events });
                }
                // A cached prefix is neither computed nor charged again, and has no fresh hidden
                // states for the drafter's trainer.
                (s.prompt_charged, s.cached) = (s.computed, s.computed);
                if let Some(t) = s.trace.as_mut() {
                    t.skipped = s.computed;
                }
                tracing::debug!(id = s.info.id, client = %s.info.client, cached = s.computed, "admitted");
                Ok(s)
            }
        }
    }

    /// Starts `s`'s empty slot on the cached blocks its tokens begin with, leaving at least one
    /// token to compute when it has no pending token (its logits give the first output).
    fn shared_prefix(&self, slot: usize, s: &Sequence, kv: &mut dyn KvSlots) -> usize {
        if !self.config.prefix_cache {
            return 0;
        }
        let target = s.prefill_target();
        let mut most = target - s.pending.is_none() as usize;
        if let Some(score) = s.request.score {
            // The position before the first scored token gives that token's logits.
            most = most.min(score.from - 1);
        }
        kv.share_prefix(slot, &s.history[..target], kv_salt(&s.request), most)
    }

    /// Whether `w` is a new request whose prompt's first block is that of a sequence still being
    /// prefilled under the same weights: it waits until those blocks are cached and shares them
    /// (the samples of one prompt, an agent's parallel calls) instead of computing them again.
    /// The wait is a step or so; for short prompts, whose chunks ride in steps that decode
    /// others anyway, it saves compute rather than time (`tandem bench prefix`, RL groups).
    fn shares_a_prefill(&self, w: &Waiting) -> bool {
        let Waiting::New { request, .. } = w else { return false };
        let Some(first) = request.prompt.get(..BLOCK).filter(|_| self.config.prefix_cache) else { return false };
        self.running.iter().any(|s| {
            s.phase() == Phase::Prefill
                && s.computed < BLOCK
                && s.history.starts_with(first)
                && kv_salt(&s.request) == kv_salt(request)
        })
    }

    /// Rows a decode step may write for one sequence: its pending token, the longest draft and
    /// the most siblings.
    fn decode_rows(&self) -> usize {
        1 + self.config.spec_k + self.config.spec_alternatives
    }

    /// Blocks `s` may still take before its first decode step is done (the rest of its prefill
    /// and that step), or decoding, in its next step.
    fn blocks_needed(&self, s: &Sequence, kv: &dyn KvSlots) -> usize {
        let to = (s.prefill_target() + self.decode_rows()).min(self.config.max_seq_len);
        kv.blocks_to_write(s.slot, s.computed, to.max(s.computed))
    }

    /// Blocks the running sequences may take before their next decode steps are done.
    fn blocks_held_back(&self, kv: &dyn KvSlots) -> usize {
        self.running.iter().map(|s| self.blocks_needed(s, kv)).sum()
    }

    /// Preempts running sequences until the others' next steps fit the KV pool: the policy's
    /// victim, else the latest arrival (the one that has waited least). One sequence always fits
    /// (the pool holds one of full length).
    fn make_room(&mut self, kv: &mut dyn KvSlots) {
        while self.running.len() > 1 && self.blocks_held_back(kv) > kv.available_blocks() {
            let running: Vec<RequestInfo> = self.running.iter().map(|r| r.info.clone()).collect();
            let waiting: Vec<RequestInfo> = self.waiting.iter().map(|w| w.info().clone()).collect();
            let latest = (0..running.len()).max_by_key(|&i| running[i].id).expect("running");
            let v = self.policy.victim(&running, &waiting).unwrap_or(latest);
            tracing::debug!(id = running[v].id, "KV pool full");
            self.preempt_one(v, kv);
        }
    }

    /// Moves the policy's victim back to waiting, its KV swapped out if the budget allows (else it
    /// is recomputed when it returns). False when the policy preempts no one.
    fn preempt(&mut self, kv: &mut dyn KvSlots) -> bool {
        let running: Vec<RequestInfo> = self.running.iter().map(|r| r.info.clone()).collect();
        let waiting: Vec<RequestInfo> = self.waiting.iter().map(|w| w.info().clone()).collect();
        let Some(v) = self.policy.victim(&running, &waiting) else { return false };
        self.preempt_one(v, kv);
        true
    }

    /// Moves running sequence `v` back to waiting, its KV swapped out if the budget allows (else
    /// it is recomputed when it returns, from whatever of its blocks are still cached).
    fn preempt_one(&mut self, v: usize, kv: &mut dyn KvSlots) {
        let mut s = self.running.remove(v);
        let budget = self.config.swap_bytes.unwrap_or_else(|| kv.cache_bytes());
        let swapped_now: usize = self.waiting.iter().map(Waiting::swapped_bytes).sum();
        match kv.snapshot(s.slot) {
            Some(snap) if swapped_now + snap.bytes() <= budget => s.swapped = Some(snap),
            _ => s.computed = 0,
        }
        kv.release(s.slot);
        self.free_slots.push(s.slot);
        tracing::debug!(id = s.info.id, client = %s.info.client, swapped = s.swapped.is_some(), "preempted");
        self.preemptions += 1;
        self.waiting.push(Waiting::Preempted(s));
    }

    /// Offers the running sequences' full blocks to later prompts (after each commit). A
    /// sequence that just met a stop token may hold it (and draft tokens after it) in its cache
    /// but not in its history: only positions its history names are offered.
    pub(crate) fn index_prefixes(&self, kv: &mut dyn KvSlots) {
        if self.config.prefix_cache {
            for s in &self.running {
                let known = s.computed.min(s.history.len());
                kv.index_prefix(s.slot, &s.history[..known], kv_salt(&s.request));
            }
        }
    }

    /// The weight-version family most decoding sequences belong to (ties: the served model's,
    /// then the family seen first): whose draft-shape controllers choose and measure the step.
    pub fn decode_family(&self) -> Family {
        let mut counts: Vec<(Family, usize)> = vec![(None, 0)];
        for s in self.running.iter().filter(|s| s.phase() == Phase::Decode) {
            let family = s.request.weights.as_ref().map(|w| w.family.clone());
            match counts.iter_mut().find(|(f, _)| *f == family) {
                Some((_, n)) => *n += 1,
                None => counts.push((family, 1)),
            }
        }
        let most = counts.iter().map(|c| c.1).max().unwrap_or(0);
        counts.into_iter().find(|c| c.1 == most).and_then(|c| c.0)
    }

    /// Which decoding sequences may draft this step and how far. `global`: one draft length and
    /// sibling budget for all (the throughput controller's choice), else each sequence's own
    /// length and the configured budget. The second value is true when some draft had to be cut
    /// below the global k (by its output limit or slot), so the step does not measure that k.
    pub fn draft_asks(&self, global: Option<(usize, usize)>) -> (Vec<DraftAsk>, bool) {
        let global_k = global.map(|g| g.0);
        let budget = global.map_or(self.config.spec_alternatives, |g| g.1);
        let mut asks = Vec::new();
        let mut cut = false;
        for (index, s) in self.running.iter().enumerate() {
            // Every weight version drafts: verification under the version's own weights decides
            // every token, and the drafter reads that version's hidden states.
            if s.phase() != Phase::Decode {
                continue;
            }
            // Drafts never run past the output limit or the slot: at most k + 1 tokens are emitted.
            let remaining = s.request.max_tokens - s.generated;
            let room = self.config.max_seq_len.saturating_sub(s.computed + 1);
            let limit = self.config.spec_k.min(remaining.saturating_sub(1)).min(room);
            let k = global_k.unwrap_or(s.draft_k).min(limit);
            cut |= global_k.is_some_and(|g| k < g);
            // Copies are free to propose: asked for even while the learned drafter is off (k = 0).
            let copy_k = s.copy_k.min(limit);
            // Siblings of the first draft token need a first token, greedy verification, and
            // cache rows of their own after the draft's.
            let alternatives = match (k > 0, s.request.sampling.temperature == 0.0) {
                (true, true) => budget.min(room - k),
                _ => 0,
            };
            if k > 0 || copy_k > 0 {
                asks.push(DraftAsk { index, k, copy_k, alternatives });
            }
        }
        (asks, cut)
    }

    /// The step: decodes first (the pending token and its draft; `drafts[i]` belongs to running
    /// sequence i), then prompt chunks in the policy's order with what is left of the token budget.
    pub fn plan(&self, mut drafts: Vec<Draft>) -> StepPlan {
        drafts.resize(self.running.len(), Draft::default());
        let mut seqs = Vec::new();
        let mut budget = self.config.step_token_budget;
        for (index, s) in self.running.iter().enumerate() {
            let (Some(t), Phase::Decode) = (s.pending, s.phase()) else { continue };
            let draft = std::mem::take(&mut drafts[index]);
            let mut tokens = vec![t];
            tokens.extend_from_slice(&draft.tokens);
            tokens.extend(draft.alternatives.iter().map(|a| a.token));
            budget = budget.saturating_sub(tokens.len());
            seqs.push(self.scheduled(index, tokens, true, draft, true));
        }
        // Prompt chunks in the policy's order (the least-served client's first under fair).
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        let (policy, running) = (&self.policy, &self.running);
        order.sort_by(|&a, &b| {
            let (a, b) = (&running[a].info, &running[b].info);
            policy.rank(a).total_cmp(&policy.rank(b)).then(a.id.cmp(&b.id))
        });
        for index in order {
            let s = &self.running[index];
            if s.phase() != Phase::Prefill || budget == 0 || s.computed == s.prefill_target() {
                continue;
            }
            // The prompt, or after a preemption the whole sequence but the pending token.
            let rest = &s.history[s.computed..s.prefill_target()];
            let n = rest.len().min(budget);
            budget -= n;
            let score = s.request.score;
            let wants_logits = n == rest.len() && s.pending.is_none() && score.is_none();
            let mut chunk = self.scheduled(index, rest[..n].to_vec(), wants_logits, Draft::default(), false);
            // Its last row is at position computed + n - 1; the first scored row at from - 1.
            chunk.scores = score.is_some_and(|sc| s.computed + n >= sc.from);
            seqs.push(chunk);
        }
        // Sequences of one weight version are contiguous: one forward each.
        seqs.sort_by_key(|p| p.weights.as_ref().map_or(0, |w| w.id + 1));
        StepPlan { seqs }
    }

    fn scheduled(&self, index: usize, tokens: Vec<u32>, wants_logits: bool, draft: Draft, decode: bool) -> Scheduled {
        let s = &self.running[index];
        Scheduled {
            index,
            slot: s.slot,
            start: s.computed,
            tokens,
            wants_logits,
            draft,
            decode,
            scores: false,
            weights: s.request.weights.clone(),
        }
    }

    /// Charges prompt tokens the first time they are computed (recomputation is free).
    pub(crate) fn charge_prompt(&mut self, index: usize, upto: usize) {
        let s = &mut self.running[index];
        let upto = upto.min(s.request.prompt.len());
        if upto > s.prompt_charged {
            self.policy.charge(&s.info, upto - s.prompt_charged, 0);
            s.prompt_charged = upto;
        }
    }

    /// Charges output tokens as they are emitted.
    pub(crate) fn charge_output(&mut self, index: usize, tokens: usize) {
        self.policy.charge(&self.running[index].info, 0, tokens);
    }

    /// Ends running sequences (finished, failed or cancelled): their slots are freed. Returns them
    /// (their traces go to the trainer).
    pub(crate) fn finish(&mut self, mut indices: Vec<usize>, kv: &mut dyn KvSlots) -> Vec<Sequence> {
        indices.sort_unstable();
        indices.dedup();
        self.last_served.retain(|_, t| t.elapsed() < RECENT_SERVING);
        let mut ended = Vec::with_capacity(indices.len());
        for i in indices.into_iter().rev() {
            let s = self.running.remove(i);
            self.policy.on_finish(&s.info);
            self.last_served.insert(s.info.entity(), std::time::Instant::now());
            kv.release(s.slot);
            self.free_slots.push(s.slot);
            ended.push(s);
        }
        ended
    }

    /// Ends every running sequence and empties every slot (after a broken invariant).
    pub(crate) fn reset(&mut self, kv: &mut dyn KvSlots) -> Vec<Sequence> {
        let ended = self.finish((0..self.running.len()).collect(), kv);
        self.free_slots = (0..self.config.max_batch).rev().collect();
        for slot in 0..self.config.max_batch {
            kv.release(slot);
        }
        ended
    }

    /// The bookkeeping the engine relies on, against the runner's cache lengths; cheap, so every
    /// step checks it. An error names the first broken rule.
    pub(crate) fn check(&self, cache_len: &dyn Fn(usize) -> usize) -> Result<(), String> {
        let mut seen = vec![false; self.config.max_batch];
        for &s in &self.free_slots {
            if std::mem::replace(&mut seen[s], true) {
                return Err(format!("slot {s} free twice"));
            }
            if cache_len(s) != 0 {
                return Err(format!("free slot {s} holds tokens"));
            }
        }
        for r in &self.running {
            if std::mem::replace(&mut seen[r.slot], true) {
                return Err(format!("slot {} used twice", r.slot));
            }
            if cache_len(r.slot) != r.computed {
                return Err(format!("slot {} holds {} tokens, its sequence {}", r.slot, cache_len(r.slot), r.computed));
            }
            if r.computed > r.prefill_target() {
                return Err(format!("slot {} is ahead of its tokens", r.slot));
            }
            if r.history.len() != r.request.prompt.len() + r.generated || r.pending.is_some() != (r.generated > 0) {
                return Err(format!("slot {}: history and output disagree", r.slot));
            }
        }
        match seen.iter().all(|&s| s) {
            true => Ok(()),
            false => Err("a slot is lost".into()),
        }
    }
}
