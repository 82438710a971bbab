//! Which request runs next, and who pays for the work. Pure bookkeeping on request descriptions:
//! no tensors, so policies are tested in milliseconds on the real `Scheduler` (see `tests`).
//!
//! Contract with the engine: `on_arrival` when a request starts waiting, `pick` to admit one into a
//! free slot, `charge` as its work is done (prompt tokens when prefilled, output tokens as they are
//! emitted), `victim` when all slots are taken and someone waits (the engine preempts that running
//! request, recomputes it later, and does not charge the recomputation), `on_finish` when it ends
//! (finished, failed or cancelled). A policy must pick something whenever anyone waits: the engine
//! never idles a free slot (work conservation). Training work (a Tinker client's forward_backward)
//! is charged with `charge_training`, between `on_arrival` and `on_finish` of a stand-in request
//! for the duration of the training request (see `EngineHandle::training_turn`).
mod fair;
mod step;

pub use fair::{FairConfig, VirtualTokenCounter};
pub(crate) use step::KvSlots;
pub use step::{DraftAsk, Scheduled, Scheduler, StepPlan, RECENT_SERVING};

/// What a policy may look at for a request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestInfo {
    /// Unique per engine, increasing with arrival.
    pub id: u64,
    /// The client it is attributed to ("default" when unattributed).
    pub client: String,
    /// An agent (a bundle of calls) within the client, if the caller named one.
    pub agent: Option<String>,
    pub prompt_tokens: usize,
}

impl RequestInfo {
    /// What fairness is counted over: the agent when named (within its client), else the client.
    pub fn entity(&self) -> String {
        match &self.agent {
            Some(a) => format!("{}/{}", self.client, a),
            None => self.client.clone(),
        }
    }
}

/// Service an entity has received, for metrics.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Service {
    pub entity: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Tokens of training work (forward_backward) done for it.
    pub train_tokens: u64,
    /// The policy's virtual counter (weighted service / weight); FCFS reports weighted tokens.
    pub counter: f64,
}

pub trait SchedulingPolicy: Send {
    fn name(&self) -> &'static str;
    fn on_arrival(&mut self, _request: &RequestInfo) {}
    /// Index into `waiting` of the request to admit next; None only when `waiting` is empty.
    fn pick(&mut self, waiting: &[RequestInfo]) -> Option<usize>;
    /// Work done for `request`: prompt tokens prefilled, output tokens emitted.
    fn charge(&mut self, _request: &RequestInfo, _input_tokens: usize, _output_tokens: usize) {}
    /// Training work done for `request`'s entity: tokens through forward_backward.
    fn charge_training(&mut self, _request: &RequestInfo, _tokens: usize) {}
    /// Whether training work of `entity` may run while `serving` (entities with serving requests
    /// waiting or running) have work. Default: always (training is charged, not held back).
    fn may_train(&self, _entity: &str, _serving: &[String]) -> bool {
        true
    }
    /// Index into `running` of a request to preempt so that a waiting one can run, or None.
    fn victim(&mut self, _running: &[RequestInfo], _waiting: &[RequestInfo]) -> Option<usize> {
        None
    }
    fn on_finish(&mut self, _request: &RequestInfo) {}
    /// Order in which running requests get the step's prompt-token budget (smaller first; ties go
    /// to the earlier arrival). Default: arrival order.
    fn rank(&self, _request: &RequestInfo) -> f64 {
        0.0
    }
    /// Service per entity so far.
    fn service(&self) -> Vec<Service> {
        Vec::new()
    }
}

/// First come, first served; never preempts. Keeps service totals for metrics.
#[derive(Debug, Default)]
pub struct Fcfs {
    /// Per entity: input, output and training tokens.
    served: std::collections::BTreeMap<String, (u64, u64, u64)>,
}

impl SchedulingPolicy for Fcfs {
    fn name(&self) -> &'static str {
        "fcfs"
    }

    fn pick(&mut self, waiting: &[RequestInfo]) -> Option<usize> {
        waiting.iter().enumerate().min_by_key(|(_, w)| w.id).map(|(i, _)| i)
    }

    fn charge(&mut self, request: &RequestInfo, input_tokens: usize, output_tokens: usize) {
        let e = self.served.entry(request.entity()).or_default();
        e.0 += input_tokens as u64;
        e.1 += output_tokens as u64;
    }

    fn charge_training(&mut self, request: &RequestInfo, tokens: usize) {
        self.served.entry(request.entity()).or_default().2 += tokens as u64;
    }

    /// Weighted with the fair policy's default weights.
    fn service(&self) -> Vec<Service> {
        let w = FairConfig::default();
        self.served
            .iter()
            .map(|(k, &(i, o, t))| Service {
                entity: k.clone(),
                input_tokens: i,
                output_tokens: o,
                train_tokens: t,
                counter: w.input_weight * i as f64 + w.output_weight * o as f64 + w.train_weight * t as f64,
            })
            .collect()
    }
}

#[cfg(test)]
mod policy_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fcfs_picks_the_earliest_arrival() {
        let w = |id| RequestInfo { id, client: "a".into(), agent: None, prompt_tokens: 1 };
        assert_eq!(Fcfs::default().pick(&[w(5), w(2), w(9)]), Some(1));
        assert_eq!(Fcfs::default().pick(&[]), None);
    }
}
