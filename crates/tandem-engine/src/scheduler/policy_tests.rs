//! Fairness and preemption properties, checked on the real `Scheduler` and commit stage with a
//! fake model runner (milliseconds per test): the engine runs this same code, so the properties
//! hold for what it serves.
use super::*;
use crate::commit::{commit, CommitKv};
use crate::engine::{EngineConfig, Event, GenerationRequest};
use crate::runner::StepOutput;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// A model runner without a model: its cache is a length per slot, and every position's logits
/// make token 1 the greedy choice.
struct FakeRunner {
    lens: Vec<usize>,
    /// The KV pool, in blocks of `BLOCK` tokens.
    blocks: usize,
}

impl FakeRunner {
    fn execute(&mut self, plan: &StepPlan) -> StepOutput {
        let (mut logits, mut logit_rows) = (Vec::new(), Vec::new());
        for p in &plan.seqs {
            assert_eq!(self.lens[p.slot], p.start, "the plan starts where the cache ends");
            self.lens[p.slot] += p.tokens.len();
            assert!(
                self.lens.iter().map(|l| l.div_ceil(tandem_models::BLOCK)).sum::<usize>() <= self.blocks,
                "KV pool overrun"
            );
            let first = logits.len();
            let rows = match (p.wants_logits, p.draft.tokens.is_empty()) {
                (false, _) => 0,
                (true, true) => 1,
                (true, false) => p.tokens.len(),
            };
            logits.extend((0..rows).map(|_| vec![0.0, 1.0]));
            logit_rows.push(first..logits.len());
        }
        StepOutput { logits, logit_rows, hidden: Vec::new() }
    }
}

impl KvSlots for FakeRunner {
    fn snapshot(&self, _slot: usize) -> Option<tandem_models::KvSnapshot> {
        None // preempted requests are recomputed
    }
    fn restore(&mut self, _slot: usize, _snapshot: &tandem_models::KvSnapshot) -> bool {
        false
    }
    fn release(&mut self, slot: usize) {
        self.lens[slot] = 0;
    }
    fn cache_bytes(&self) -> usize {
        0
    }
    fn share_prefix(&mut self, _slot: usize, _tokens: &[u32], _salt: u64, _most: usize) -> usize {
        0
    }
    fn index_prefix(&mut self, _slot: usize, _tokens: &[u32], _salt: u64) {}
    fn available_blocks(&self) -> usize {
        let held: usize = self.lens.iter().map(|l| l.div_ceil(tandem_models::BLOCK)).sum();
        self.blocks - held
    }
    fn blocks_to_write(&self, slot: usize, from: usize, to: usize) -> usize {
        let _ = from;
        to.div_ceil(tandem_models::BLOCK).saturating_sub(self.lens[slot].div_ceil(tandem_models::BLOCK))
    }
}

impl CommitKv for FakeRunner {
    fn keep(&mut self, slot: usize, start: usize, _fed: usize, kept: usize, _sibling: Option<usize>) {
        self.lens[slot] = start + kept;
    }
    fn observe(&mut self, _: usize, _: usize, _: usize, _: usize, _: &[candle_core::Tensor]) {}
    fn drafting(&self) -> bool {
        false
    }
}

/// The policy under test, with every charge recorded as (request id, input, output).
struct Recording {
    inner: Box<dyn SchedulingPolicy>,
    charges: Arc<Mutex<Vec<(u64, usize, usize)>>>,
}

impl SchedulingPolicy for Recording {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn on_arrival(&mut self, r: &RequestInfo) {
        self.inner.on_arrival(r)
    }
    fn pick(&mut self, waiting: &[RequestInfo]) -> Option<usize> {
        self.inner.pick(waiting)
    }
    fn charge(&mut self, r: &RequestInfo, input: usize, output: usize) {
        self.charges.lock().unwrap().push((r.id, input, output));
        self.inner.charge(r, input, output)
    }
    fn victim(&mut self, running: &[RequestInfo], waiting: &[RequestInfo]) -> Option<usize> {
        self.inner.victim(running, waiting)
    }
    fn charge_training(&mut self, r: &RequestInfo, tokens: usize) {
        self.inner.charge_training(r, tokens)
    }
    fn may_train(&self, entity: &str, serving: &[String]) -> bool {
        self.inner.may_train(entity, serving)
    }
    fn on_finish(&mut self, r: &RequestInfo) {
        self.inner.on_finish(r)
    }
    fn rank(&self, r: &RequestInfo) -> f64 {
        self.inner.rank(r)
    }
    fn service(&self) -> Vec<Service> {
        self.inner.service()
    }
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq)]
struct SimStep {
    /// (id, input tokens, output tokens) charged this step.
    charged: Vec<(u64, usize, usize)>,
    admitted: Vec<u64>,
    preempted: Vec<u64>,
    finished: Vec<u64>,
    /// Free slots left after admission while requests still waited (must always be 0).
    idle_slots_while_waiting: usize,
}

/// The engine's step on the real scheduler and commit stage, the fake runner in the model's place.
struct Simulator {
    sched: Scheduler,
    kv: FakeRunner,
    config: EngineConfig,
    charges: Arc<Mutex<Vec<(u64, usize, usize)>>>,
    /// Each request's event channel, kept open (a closed one is a cancelled request).
    events: HashMap<u64, UnboundedReceiver<Event>>,
    submitted: u32,
}

impl Simulator {
    fn new(policy: Box<dyn SchedulingPolicy>, slots: usize, step_token_budget: usize) -> Self {
        Self::with_pool(policy, slots, step_token_budget, slots * 4096 / tandem_models::BLOCK)
    }

    /// A simulator whose KV pool holds `blocks` blocks.
    fn with_pool(policy: Box<dyn SchedulingPolicy>, slots: usize, step_token_budget: usize, blocks: usize) -> Self {
        let config = EngineConfig { max_batch: slots, step_token_budget, max_seq_len: 4096, ..Default::default() };
        let charges = Arc::new(Mutex::new(Vec::new()));
        let policy = Box::new(Recording { inner: policy, charges: charges.clone() });
        Simulator {
            sched: Scheduler::new(config.clone(), policy),
            kv: FakeRunner { lens: vec![0; slots], blocks },
            config,
            charges,
            events: HashMap::new(),
            submitted: 0,
        }
    }

    /// Queues a request; returns its id.
    fn submit(&mut self, client: &str, agent: Option<&str>, prompt_tokens: usize, output_tokens: usize) -> u64 {
        // Distinct prompts: the same first block would make a request wait to share it.
        self.submitted += 1;
        let first = self.submitted * 1000;
        let request = GenerationRequest {
            prompt: (first..first + prompt_tokens.max(1) as u32).collect(),
            max_tokens: output_tokens.max(1),
            sampling: Default::default(),
            stop_token_ids: Vec::new(),
            client: Some(client.into()),
            agent: agent.map(Into::into),
            weights: None,
            score: None,
        };
        let (tx, rx) = unbounded_channel();
        let id = self.sched.add(request, tx);
        self.events.insert(id, rx);
        id
    }

    /// Requests of `entity` waiting or running.
    fn active(&self, entity: &str) -> usize {
        let waiting = self.sched.waiting.iter().map(|w| w.info());
        let running = self.sched.running.iter().map(|s| &s.info);
        waiting.chain(running).filter(|i| i.entity() == entity).count()
    }

    fn running_ids(&self) -> Vec<u64> {
        self.sched.running.iter().map(|s| s.info.id).collect()
    }

    fn step(&mut self) -> SimStep {
        let mut out = SimStep::default();
        let before = self.running_ids();
        self.sched.admit(&mut self.kv, &|_| None);
        let after = self.running_ids();
        out.admitted = after.iter().filter(|id| !before.contains(id)).copied().collect();
        out.preempted = before.iter().filter(|id| !after.contains(id)).copied().collect();
        if self.sched.waiting_len() > 0 {
            out.idle_slots_while_waiting = self.config.max_batch - self.sched.running_len();
        }
        let plan = self.sched.plan(Vec::new());
        let output = self.kv.execute(&plan);
        let report = commit(&mut self.sched, &mut self.kv, &self.config, &plan, &output);
        out.finished = report.finished.iter().map(|&i| self.sched.running[i].info.id).collect();
        out.finished.sort_unstable();
        for s in self.sched.finish(report.finished, &mut self.kv) {
            self.events.remove(&s.info.id);
        }
        let lens = &self.kv.lens;
        self.sched.check(&|slot| lens[slot]).unwrap();
        out.charged = std::mem::take(&mut *self.charges.lock().unwrap());
        out
    }
}

/// The engine's bookkeeping holds after preemptions: a preempted request is recomputed, charged
/// its prompt once, and finishes with exactly its output.
#[test]
fn preempted_requests_are_recomputed_and_charged_once() {
    let eager = Box::new(VirtualTokenCounter::new(FairConfig { preempt_margin: Some(16.0), ..Default::default() }));
    let mut sim = Simulator::new(eager, 2, 32);
    let mut input: HashMap<u64, usize> = HashMap::new();
    let mut output: HashMap<u64, usize> = HashMap::new();
    let mut preempted = 0;
    for step in 0..400 {
        if step < 40 {
            sim.submit(if step % 2 == 0 { "a" } else { "b" }, None, 20 + step, 10);
        }
        let s = sim.step();
        preempted += s.preempted.len();
        for (id, i, o) in s.charged {
            *input.entry(id).or_default() += i;
            *output.entry(id).or_default() += o;
        }
    }
    assert!(preempted > 0, "the test must preempt");
    assert!(sim.sched.is_idle());
    assert_eq!(input.len(), 40);
    for (id, i) in input {
        assert_eq!(i, 20 + id as usize, "request {id}: prompt charged once");
        assert_eq!(output[&id], 10, "request {id}: output charged as emitted");
    }
}

/// A KV pool smaller than the batch's sequences: sequences are admitted while the pool has room
/// for their prompts, preempted when the running ones' next steps no longer fit, and every
/// request still finishes with exactly its output; the pool is never overrun (the fake runner
/// checks every step).
#[test]
fn a_small_kv_pool_bounds_what_runs_and_everything_finishes() {
    for policy in [Box::new(Fcfs::default()) as Box<dyn SchedulingPolicy>, Box::new(VirtualTokenCounter::default())] {
        // 40 blocks of 16 = 640 tokens for 8 slots of requests of 100 + 150 tokens.
        let mut sim = Simulator::with_pool(policy, 8, 64, 40);
        let mut output: HashMap<u64, usize> = HashMap::new();
        let (mut preempted, mut most_running) = (0, 0);
        for step in 0..3000 {
            if step < 12 {
                sim.submit(if step % 2 == 0 { "a" } else { "b" }, None, 100, 150);
            }
            let s = sim.step();
            preempted += s.preempted.len();
            most_running = most_running.max(sim.sched.running_len());
            for (id, _, o) in s.charged {
                *output.entry(id).or_default() += o;
            }
            if step > 12 && sim.sched.is_idle() {
                break;
            }
        }
        assert!(sim.sched.is_idle(), "everything finishes");
        assert!(preempted > 0, "the pool must run out and preempt");
        assert!(most_running < 8, "the pool, not the slots, bounded the batch");
        assert_eq!(output.len(), 12);
        assert!(output.values().all(|&o| o == 150), "{output:?}");
    }
}

/// When the pool, not the slots, is full, the fair policy still lets a client with nothing
/// running in soon (the policy picks it first when preemptions free blocks, and may preempt for
/// it as for a slot), where FCFS makes it wait behind the heavy client's requests.
#[test]
fn a_light_client_gets_into_a_full_pool_under_the_fair_policy() {
    let finish_step = |policy: Box<dyn SchedulingPolicy>| {
        // 30 blocks of 16 = 480 tokens: five of the heavy client's 50 + 200-token requests
        // outgrow it; eight slots stay free of the pool's limit.
        let mut sim = Simulator::with_pool(policy, 8, 64, 30);
        for _ in 0..5 {
            sim.submit("heavy", None, 50, 200);
        }
        let mut light = None;
        for step in 0..4000 {
            if step == 60 {
                light = Some(sim.submit("light", None, 20, 10));
            }
            let s = sim.step();
            if light.is_some_and(|id| s.finished.contains(&id)) {
                return step;
            }
        }
        panic!("the light request never finished");
    };
    let fair = finish_step(Box::<VirtualTokenCounter>::default());
    let fcfs = finish_step(Box::<Fcfs>::default());
    assert!(fair < 60 + 40, "fair: the light request finished at step {fair}");
    assert!(fcfs > fair, "FCFS {fcfs} vs fair {fair}");
}

const SLOTS: usize = 8;
const BUDGET: usize = 64;

/// Deterministic pseudo-random lengths.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, lo: usize, hi: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        lo + (self.0 >> 33) as usize % (hi - lo + 1)
    }
}

const MAX_PROMPT: usize = 256;
const MAX_OUTPUT: usize = 128;

fn fair(weights: &[(&str, f64)]) -> Box<dyn SchedulingPolicy> {
    let client_weights = weights.iter().map(|(c, w)| (c.to_string(), *w)).collect();
    Box::new(VirtualTokenCounter::new(FairConfig { client_weights, ..Default::default() }))
}

/// Weighted service (1 per input token, 2 per output token) per client, from a step's charges.
fn tally(step: &SimStep, owner: &HashMap<u64, String>, service: &mut HashMap<String, f64>) {
    for &(id, i, o) in &step.charged {
        *service.entry(owner[&id].clone()).or_default() += i as f64 + 2.0 * o as f64;
    }
}

/// Keeps each listed client backlogged with `depth` outstanding requests for `steps` steps;
/// returns the service per client after each step.
fn backlogged(
    policy: Box<dyn SchedulingPolicy>,
    clients: &[&str],
    depth: usize,
    steps: usize,
) -> Vec<HashMap<String, f64>> {
    let mut sim = Simulator::new(policy, SLOTS, BUDGET);
    let mut rng = Lcg(7);
    let mut owner = HashMap::new();
    let mut service: HashMap<String, f64> = HashMap::new();
    let mut history = Vec::new();
    for _ in 0..steps {
        for c in clients {
            while sim.active(c) < depth {
                let id = sim.submit(c, None, rng.next(16, MAX_PROMPT), rng.next(8, MAX_OUTPUT));
                owner.insert(id, c.to_string());
            }
        }
        let step = sim.step();
        assert_eq!(step.idle_slots_while_waiting, 0, "a slot idled while requests waited");
        tally(&step, &owner, &mut service);
        history.push(service.clone());
    }
    history
}

/// The largest cost of one request: w_in * longest prompt + w_out * longest output.
const U: f64 = MAX_PROMPT as f64 + 2.0 * MAX_OUTPUT as f64;

#[test]
fn the_service_gap_of_two_backlogged_clients_stays_bounded() {
    let margin = FairConfig::default().preempt_margin.unwrap();
    // The bound: the preemption margin plus one request's cost.
    let bound = margin + U;
    let history = backlogged(fair(&[]), &["a", "b"], 20, 4000);
    let worst = history
        .iter()
        .map(|s| (s.get("a").copied().unwrap_or(0.0) - s.get("b").copied().unwrap_or(0.0)).abs())
        .fold(0.0, f64::max);
    assert!(worst <= bound, "gap {worst} exceeds the bound {bound}");
    // FCFS has no such bound: the client with more queued requests pulls ahead without limit.
    let fcfs = backlogged_uneven(Box::new(Fcfs::default()));
    let fair_uneven = backlogged_uneven(fair(&[]));
    assert!(fcfs > 4.0 * bound, "FCFS gap {fcfs}");
    assert!(fair_uneven <= bound, "fair gap with uneven queues {fair_uneven}");
}

/// Client "a" keeps 30 requests outstanding, "b" 10 (both more than the 8 slots, so both stay
/// backlogged): the largest service gap.
fn backlogged_uneven(policy: Box<dyn SchedulingPolicy>) -> f64 {
    let mut sim = Simulator::new(policy, SLOTS, BUDGET);
    let mut rng = Lcg(11);
    let mut owner = HashMap::new();
    let mut service: HashMap<String, f64> = HashMap::new();
    let mut worst: f64 = 0.0;
    for _ in 0..3000 {
        for (c, depth) in [("a", 30), ("b", 10)] {
            while sim.active(c) < depth {
                let id = sim.submit(c, None, rng.next(16, MAX_PROMPT), rng.next(8, MAX_OUTPUT));
                owner.insert(id, c.to_string());
            }
        }
        let step = sim.step();
        assert_eq!(step.idle_slots_while_waiting, 0);
        tally(&step, &owner, &mut service);
        worst = worst.max((service.get("a").copied().unwrap_or(0.0) - service.get("b").copied().unwrap_or(0.0)).abs());
    }
    worst
}

#[test]
fn weights_two_to_one_give_service_two_to_one() {
    let history = backlogged(fair(&[("a", 2.0)]), &["a", "b"], 20, 6000);
    let last = history.last().unwrap();
    let ratio = last["a"] / last["b"];
    assert!((ratio - 2.0).abs() / 2.0 < 0.05, "service ratio {ratio}");
}

#[test]
fn a_client_returning_from_idle_gains_no_credit() {
    let mut sim = Simulator::new(fair(&[]), SLOTS, BUDGET);
    let mut rng = Lcg(3);
    let mut owner = HashMap::new();
    let mut service: HashMap<String, f64> = HashMap::new();
    // "a" alone for a long time, then "b" arrives; both stay backlogged.
    for step in 0..3000 {
        let clients: &[&str] = if step < 1500 { &["a"] } else { &["a", "b"] };
        for c in clients {
            while sim.active(c) < 20 {
                let id = sim.submit(c, None, rng.next(16, MAX_PROMPT), rng.next(8, MAX_OUTPUT));
                owner.insert(id, c.to_string());
            }
        }
        if step == 1500 {
            service.clear(); // measure only from b's arrival on
        }
        let s = sim.step();
        assert_eq!(s.idle_slots_while_waiting, 0);
        tally(&s, &owner, &mut service);
        if step > 1500 {
            // b never gets far ahead of a, though a was served alone for 1500 steps.
            let lead = service.get("b").copied().unwrap_or(0.0) - service.get("a").copied().unwrap_or(0.0);
            assert!(lead <= FairConfig::default().preempt_margin.unwrap() + U, "b leads by {lead} at step {step}");
        }
    }
    let share = service["b"] / (service["a"] + service["b"]);
    assert!((share - 0.5).abs() < 0.05, "b's share after returning: {share}");
}

/// With one client every policy is FCFS: identical admissions, preemptions and completions.
#[test]
fn fair_and_fcfs_agree_for_a_single_client() {
    let run = |policy: Box<dyn SchedulingPolicy>| {
        let mut sim = Simulator::new(policy, SLOTS, BUDGET);
        let mut rng = Lcg(5);
        let mut log = Vec::new();
        for step in 0..2000 {
            if rng.next(0, 3) == 0 || step % 50 < 5 {
                sim.submit("only", None, rng.next(1, 300), rng.next(1, 100));
            }
            log.push(sim.step());
        }
        log
    };
    let fcfs = run(Box::<Fcfs>::default());
    let fair = run(fair(&[]));
    assert!(fcfs.iter().map(|s| s.finished.len()).sum::<usize>() > 100);
    assert_eq!(fcfs, fair);
}

/// An agent that fans out many calls is one entity: a one-call agent of the same client and weight
/// is admitted at once rather than behind the fan-out.
#[test]
fn a_many_call_agent_cannot_crowd_out_a_one_call_agent() {
    let wait_of_single = |policy: Box<dyn SchedulingPolicy>| {
        let mut sim = Simulator::new(policy, SLOTS, BUDGET);
        let mut rng = Lcg(9);
        let mut worst_wait = 0;
        let mut pending: Option<(u64, usize)> = None; // the one-call agent's request and submit step
        for step in 0..3000 {
            while sim.active("team/swarm") < 32 {
                sim.submit("team", Some("swarm"), rng.next(16, 128), rng.next(8, 64));
            }
            if pending.is_none() && sim.active("team/solo") == 0 {
                pending = Some((sim.submit("team", Some("solo"), 32, 16), step));
            }
            let s = sim.step();
            if let Some((id, at)) = pending {
                if s.admitted.contains(&id) {
                    worst_wait = worst_wait.max(step - at);
                    pending = None;
                }
            }
        }
        worst_wait
    };
    let fair_wait = wait_of_single(fair(&[]));
    let fcfs_wait = wait_of_single(Box::<Fcfs>::default());
    // Without preemption-worthy gaps the solo call takes the next free slot ...
    assert!(fair_wait * 4 < fcfs_wait, "fair: {fair_wait} steps, FCFS: {fcfs_wait} steps behind the swarm");
    // ... and with a small preemption margin it runs almost at once.
    let eager = Box::new(VirtualTokenCounter::new(FairConfig { preempt_margin: Some(32.0), ..Default::default() }));
    let eager_wait = wait_of_single(eager);
    assert!(eager_wait <= 3, "the solo agent waited {eager_wait} steps");
}
