//! Training work inside the scheduling policy. A Tinker client's forward_backward runs on its
//! training thread, beside the engine's steps, on the same cores; without this it was served
//! uncharged, so one trainer slowed every serving client. Now each training request takes a
//! `TrainingTurn`: it enters the policy as a stand-in request of its client (an entity back from
//! idle is lifted to parity, as for serving), waits until the policy grants it the machine
//! (`SchedulingPolicy::may_train`: under the fair policy, once no client with serving work has been
//! served less), and charges the tokens it processed (`FairConfig::train_weight` each) when done.
//! Serving never waits for training; training waits while a less-served client has work. The
//! server takes a turn per pass of a forward_backward, so a long batch waits between passes too.
use crate::engine::{Command, EngineHandle, TrainingEvent};
use crate::scheduler::RequestInfo;
use std::time::{Duration, Instant};

/// One training request's place in the scheduling policy; leaves it when dropped.
pub struct TrainingTurn {
    handle: EngineHandle,
    info: RequestInfo,
    /// How long the policy made it wait.
    pub waited: Duration,
    /// Another client had serving work when the turn was granted, or had within
    /// `RECENT_SERVING`: the turn shares the machine, so the trainer keeps it short. The
    /// client's own requests (an RL loop's rollouts) do not count.
    pub shared: bool,
}

impl EngineHandle {
    /// Enters training work of `client` (and `agent` within it) into the policy and blocks until
    /// the engine grants it (at once when nothing is being served). A stopped engine grants all.
    pub fn training_turn(&self, client: &str, agent: Option<&str>) -> TrainingTurn {
        let info = RequestInfo {
            id: u64::MAX,
            client: client.to_string(),
            agent: agent.map(str::to_string),
            prompt_tokens: 0,
        };
        let started = Instant::now();
        let (grant, granted) = std::sync::mpsc::channel();
        let mut shared = false;
        if self.send(Command::Training { info: info.clone(), event: TrainingEvent::Begin(grant) }) {
            shared = granted.recv().unwrap_or(false);
        }
        TrainingTurn { handle: self.clone(), info, waited: started.elapsed(), shared }
    }
}

impl TrainingTurn {
    /// `tokens` of training work done: through forward and backward (`backward`, charged as
    /// training tokens), or forward only (charged as prompt tokens: the same work as a prefill).
    pub fn charge(&self, tokens: usize, backward: bool) {
        let event = TrainingEvent::Charge { tokens, backward };
        self.handle.send(Command::Training { info: self.info.clone(), event });
    }
}

impl Drop for TrainingTurn {
    fn drop(&mut self) {
        self.handle.send(Command::Training { info: self.info.clone(), event: TrainingEvent::End });
    }
}
