//! tandem-engine: one thread owns the model and the KV cache and serves many generation requests
//! at once with continuous batching. Callers hold a cheap, clonable [`EngineHandle`]; each request
//! gets its own channel of [`Event`]s. Dropping that channel's receiver cancels the request.
//!
//! One step of the loop (`Engine::step`), in the order a request meets the parts:
//! - the [`Scheduler`] (`scheduler`) takes new requests, drops those whose client has gone,
//!   admits waiting ones into free KV slots in its [`SchedulingPolicy`]'s order (preempting when
//!   the policy says so), and lays out a tensor-free [`StepPlan`]: decodes with their drafts first,
//!   then prompt chunks under the step's token budget;
//! - the model runner (`runner`) asks the drafter for drafts, and turns the plan into a
//!   [`StepOutput`] (logits rows, hidden states) with one forward per weight version;
//! - the commit stage (`commit`) samples or verifies, rolls rejected drafts out of the cache,
//!   sends tokens, applies stop and length checks and charges the policy;
//! - online learning (`learning`) observes the committed step: traces for the drafter's
//!   trainer, rollback of a drafter version that lowered acceptance, the draft shape controller.
//!
//! Training requests of the Tinker API run on their own threads, inside the same scheduling
//! policy (`training`: a turn per request, charged by the tokens it processed).
mod commit;
mod engine;
mod learning;
pub mod online;
mod runner;
pub mod scheduler;
mod sequence;
mod spec_stats;
mod training;

pub use engine::{
    Control, Engine, EngineConfig, EngineError, EngineHandle, Event, GenerationRequest, ScoreSpec, TokenScore, Usage,
    WeightVersion, MAX_SCORE_TOP_K,
};
pub use runner::{ServedDrafter, StepOutput};
pub use scheduler::{
    FairConfig, Fcfs, RequestInfo, Scheduled, Scheduler, SchedulingPolicy, Service, StepPlan, VirtualTokenCounter,
};
pub use sequence::Phase;
pub use spec_stats::{SpecStats, SpecUsage, StepKinds, StepTally};
pub use training::TrainingTurn;
