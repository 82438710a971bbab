//! tandem-runtime: sampling, chat templates and generation on top of tandem-models.
pub mod chat;
pub mod generate;
pub mod sampling;
pub mod spec;

pub use chat::{ChatTemplate, Message};
pub use generate::{generate, FinishReason, GenerateOptions, Generation, GenerationStats, TextStream};
pub use sampling::{SampledToken, Sampler, SamplingParams, Target};
