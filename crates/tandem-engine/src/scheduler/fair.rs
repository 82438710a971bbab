//! Virtual token counters (VTC, Sheng et al., OSDI 2024), per client or per agent, with weights.
//!
//! Each entity's counter grows by (w_in * input tokens + w_out * output tokens + w_train * training
//! tokens) / weight as its work is done. The waiting request of the entity with the smallest counter is admitted next (FCFS within
//! an entity). When an entity becomes active (from no waiting or running request), its counter is
//! lifted to the smallest counter among active entities, so idle time earns no credit. When every
//! slot is taken, a waiting entity whose counter trails the largest running entity's by more than
//! `preempt_margin` preempts that entity's newest running request.
use super::{RequestInfo, SchedulingPolicy, Service};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq)]
pub struct FairConfig {
    /// Cost of one prompt token and of one output token (VTC's defaults: 1 and 2).
    pub input_weight: f64,
    pub output_weight: f64,
    /// Cost of one token of training (forward_backward): 3, as its forward and the backward's two
    /// products (gradients of activations and of weights) each cost about one prompt token.
    pub train_weight: f64,
    /// Client weights (default 1): a client of weight 2 gets twice the service of one of weight 1.
    pub client_weights: HashMap<String, f64>,
    /// Counter gap (weighted tokens) beyond which a waiting entity preempts a running one; None
    /// turns preemption off. Large enough that a preempted request is not recomputed over and over.
    pub preempt_margin: Option<f64>,
}

impl Default for FairConfig {
    fn default() -> Self {
        FairConfig {
            input_weight: 1.0,
            output_weight: 2.0,
            train_weight: 3.0,
            client_weights: HashMap::new(),
            preempt_margin: Some(1024.0),
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Entity {
    counter: f64,
    /// Requests waiting or running.
    active: usize,
    input_tokens: u64,
    output_tokens: u64,
    train_tokens: u64,
}

#[derive(Debug, Default)]
pub struct VirtualTokenCounter {
    config: FairConfig,
    entities: BTreeMap<String, Entity>,
}

impl VirtualTokenCounter {
    pub fn new(config: FairConfig) -> Self {
        VirtualTokenCounter { config, entities: BTreeMap::new() }
    }

    fn weight(&self, client: &str) -> f64 {
        self.config.client_weights.get(client).copied().filter(|w| *w > 0.0).unwrap_or(1.0)
    }

    pub fn counter(&self, entity: &str) -> f64 {
        self.entities.get(entity).map_or(0.0, |e| e.counter)
    }
}

impl SchedulingPolicy for VirtualTokenCounter {
    fn name(&self) -> &'static str {
        "fair"
    }

    fn on_arrival(&mut self, request: &RequestInfo) {
        let key = request.entity();
        let becomes_active = self.entities.get(&key).is_none_or(|e| e.active == 0);
        if becomes_active {
            // Lift to the least-served active entity; with nobody active, to the most-served
            // entity ever seen (differences only matter between active entities).
            let active_min = self.entities.values().filter(|e| e.active > 0).map(|e| e.counter).reduce(f64::min);
            let floor = active_min.or_else(|| self.entities.values().map(|e| e.counter).reduce(f64::max));
            let e = self.entities.entry(key.clone()).or_default();
            if let Some(f) = floor {
                e.counter = e.counter.max(f);
            }
        }
        self.entities.entry(key).or_default().active += 1;
    }

    fn pick(&mut self, waiting: &[RequestInfo]) -> Option<usize> {
        waiting
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| {
                self.counter(&a.entity()).total_cmp(&self.counter(&b.entity())).then(a.id.cmp(&b.id))
            })
            .map(|(i, _)| i)
    }

    fn charge(&mut self, request: &RequestInfo, input_tokens: usize, output_tokens: usize) {
        let w = self.weight(&request.client);
        let cost =
            (self.config.input_weight * input_tokens as f64 + self.config.output_weight * output_tokens as f64) / w;
        let e = self.entities.entry(request.entity()).or_default();
        e.counter += cost;
        e.input_tokens += input_tokens as u64;
        e.output_tokens += output_tokens as u64;
    }

    fn charge_training(&mut self, request: &RequestInfo, tokens: usize) {
        let cost = self.config.train_weight * tokens as f64 / self.weight(&request.client);
        let e = self.entities.entry(request.entity()).or_default();
        e.counter += cost;
        e.train_tokens += tokens as u64;
    }

    /// Once no entity with serving work has a smaller counter: training gets the machine only
    /// while its client trails in service, as a waiting request would be admitted.
    fn may_train(&self, entity: &str, serving: &[String]) -> bool {
        let mine = self.counter(entity);
        serving.iter().all(|e| mine <= self.counter(e))
    }

    fn victim(&mut self, running: &[RequestInfo], waiting: &[RequestInfo]) -> Option<usize> {
        let margin = self.config.preempt_margin?;
        let next = &waiting[self.pick(waiting)?];
        let next_entity = next.entity();
        let next_counter = self.counter(&next_entity);
        // The most-served running entity other than the waiter's; its newest request goes.
        let (i, r) =
            running.iter().enumerate().filter(|(_, r)| r.entity() != next_entity).max_by(|(_, a), (_, b)| {
                self.counter(&a.entity()).total_cmp(&self.counter(&b.entity())).then(a.id.cmp(&b.id))
            })?;
        let gap = self.counter(&r.entity()) - next_counter;
        // An entity with nothing running (typically one just back from idle, lifted to parity)
        // needs no margin: one slot for it is its fair share at once. Others must trail by more
        // than the margin, so two busy entities do not swap slots back and forth.
        let starved = !running.iter().any(|r| r.entity() == next_entity);
        (gap > margin || (starved && gap >= 0.0)).then_some(i)
    }

    /// The least-served entity's prompts are read first, so a light client's short prompt is not
    /// stuck behind a heavy client's long ones.
    fn rank(&self, request: &RequestInfo) -> f64 {
        self.counter(&request.entity())
    }

    fn on_finish(&mut self, request: &RequestInfo) {
        if let Some(e) = self.entities.get_mut(&request.entity()) {
            e.active = e.active.saturating_sub(1);
        }
    }

    fn service(&self) -> Vec<Service> {
        self.entities
            .iter()
            .map(|(k, e)| Service {
                entity: k.clone(),
                input_tokens: e.input_tokens,
                output_tokens: e.output_tokens,
                train_tokens: e.train_tokens,
                counter: e.counter,
            })
            .collect()
    }
}
