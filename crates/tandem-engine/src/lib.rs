//! tandem-engine: one thread owns the model and the KV cache and serves many generation requests
//! at once with continuous batching. Callers hold a cheap, clonable [`EngineHandle`]; each request
//! gets its own channel of [`Event`]s. Dropping that channel's receiver cancels the request.
//!
//! One step of the loop: take new commands, drop requests whose client has gone, admit waiting
//! requests into free KV slots (the order is a [`SchedulingPolicy`]), build one batch under a token
//! budget (every decoding sequence advances one token, prefills take the rest in chunks), run one
//! forward, sample, and send each request its token.
mod engine;
pub mod online;
pub mod scheduler;
mod spec_stats;

pub use engine::{Engine, EngineConfig, EngineError, EngineHandle, Event, GenerationRequest, Usage, WeightVersion};
pub use scheduler::{sim, FairConfig, Fcfs, RequestInfo, SchedulingPolicy, Service, VirtualTokenCounter};
pub use spec_stats::{SpecStats, SpecUsage};
