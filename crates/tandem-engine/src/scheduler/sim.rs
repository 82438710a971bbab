//! A model-free engine loop for testing and studying policies: the real engine's admission,
//! preemption and step-budget rules, with each running request emitting one token per step.
use super::{RequestInfo, SchedulingPolicy};

#[derive(Debug, Clone)]
struct SimRequest {
    info: RequestInfo,
    output_tokens: usize,
    /// Prompt tokens in the (simulated) KV cache; reset by preemption.
    computed: usize,
    /// Prompt tokens already charged (recomputation after preemption is not charged again).
    charged: usize,
    generated: usize,
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimStep {
    /// (id, input tokens, output tokens) charged this step.
    pub charged: Vec<(u64, usize, usize)>,
    pub admitted: Vec<u64>,
    pub preempted: Vec<u64>,
    pub finished: Vec<u64>,
    /// Free slots left after admission while requests still waited (must always be 0).
    pub idle_slots_while_waiting: usize,
}

pub struct Simulator {
    pub policy: Box<dyn SchedulingPolicy>,
    slots: usize,
    step_token_budget: usize,
    waiting: Vec<SimRequest>,
    running: Vec<SimRequest>,
    next_id: u64,
}

impl Simulator {
    pub fn new(policy: Box<dyn SchedulingPolicy>, slots: usize, step_token_budget: usize) -> Self {
        Simulator { policy, slots, step_token_budget, waiting: Vec::new(), running: Vec::new(), next_id: 0 }
    }

    /// Queues a request; returns its id.
    pub fn submit(&mut self, client: &str, agent: Option<&str>, prompt_tokens: usize, output_tokens: usize) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let info = RequestInfo { id, client: client.into(), agent: agent.map(Into::into), prompt_tokens };
        self.policy.on_arrival(&info);
        self.waiting.push(SimRequest {
            info,
            output_tokens: output_tokens.max(1),
            computed: 0,
            charged: 0,
            generated: 0,
        });
        id
    }

    /// Requests of `entity` waiting or running.
    pub fn active(&self, entity: &str) -> usize {
        self.waiting.iter().chain(&self.running).filter(|r| r.info.entity() == entity).count()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn step(&mut self) -> SimStep {
        let mut out = SimStep::default();
        self.admit(&mut out);
        // Decodes first (one token each), then prompt chunks under the budget.
        let mut budget = self.step_token_budget;
        for r in &mut self.running {
            if r.computed == r.info.prompt_tokens && r.generated > 0 {
                r.generated += 1;
                budget = budget.saturating_sub(1);
                out.charged.push((r.info.id, 0, 1));
            }
        }
        let policy = &self.policy;
        self.running
            .sort_by(|a, b| policy.rank(&a.info).total_cmp(&policy.rank(&b.info)).then(a.info.id.cmp(&b.info.id)));
        for r in &mut self.running {
            if r.computed < r.info.prompt_tokens && budget > 0 {
                let n = (r.info.prompt_tokens - r.computed).min(budget);
                budget -= n;
                r.computed += n;
                let new = r.computed.saturating_sub(r.charged);
                r.charged = r.charged.max(r.computed);
                let first_token = r.computed == r.info.prompt_tokens && r.generated == 0;
                if first_token {
                    r.generated = 1;
                }
                out.charged.push((r.info.id, new, first_token as usize));
            }
        }
        for &(id, i, o) in &out.charged {
            let r = self.running.iter().find(|r| r.info.id == id).expect("charged requests run");
            self.policy.charge(&r.info, i, o);
        }
        let mut k = 0;
        while k < self.running.len() {
            if self.running[k].generated >= self.running[k].output_tokens {
                let r = self.running.remove(k);
                self.policy.on_finish(&r.info);
                out.finished.push(r.info.id);
            } else {
                k += 1;
            }
        }
        out
    }

    fn admit(&mut self, out: &mut SimStep) {
        loop {
            if self.waiting.is_empty() {
                break;
            }
            if self.running.len() >= self.slots {
                // At most one preemption per step, so a burst cannot churn the batch.
                if !out.preempted.is_empty() {
                    break;
                }
                let running: Vec<RequestInfo> = self.running.iter().map(|r| r.info.clone()).collect();
                let waiting: Vec<RequestInfo> = self.waiting.iter().map(|r| r.info.clone()).collect();
                let Some(v) = self.policy.victim(&running, &waiting) else { break };
                let mut r = self.running.remove(v);
                // Recompute from scratch later: the prompt and what was generated so far.
                r.computed = 0;
                out.preempted.push(r.info.id);
                self.waiting.push(r);
                continue;
            }
            let waiting: Vec<RequestInfo> = self.waiting.iter().map(|r| r.info.clone()).collect();
            let Some(i) = self.policy.pick(&waiting) else { break };
            let r = self.waiting.remove(i);
            out.admitted.push(r.info.id);
            self.running.push(r);
        }
        if !self.waiting.is_empty() {
            out.idle_slots_while_waiting = self.slots.saturating_sub(self.running.len());
        }
    }
}
