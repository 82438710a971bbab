//! tandem-evolve: test-time evolution as orchestration over an engine.
//!
//! - RSA (Recursive Self-Aggregation, arXiv 2509.26626): N samples, then T - 1 rounds in which
//!   each new candidate is written from K earlier ones by an aggregation prompt; the answer is
//!   the final population's majority vote.
//! - Squeeze Evolve (arXiv 2604.07725): the same loop over two models, each later round's
//!   groups routed by a prefill-only confidence score — the least confident groups to the
//!   expensive model, the rest to the cheap one, optionally the most confident to a plain vote.
//!
//! The engine side is a `Backend` (the server's models, or a fake in tests); `config` holds the
//! virtual model's settings, `answer` the one answer extractor every method uses, and `task` an
//! offline task with exact answers for the benchmark.
pub mod answer;
pub mod config;
pub mod evolve;
pub mod task;

pub use answer::{extract, majority, Extractor};
pub use config::EvolveConfig;
pub use evolve::{
    aggregation_prompt, evolve, route, Backend, Cost, GenerateCall, Generated, Group, Outcome, Round, Route, ScoreCall,
    Scored,
};
