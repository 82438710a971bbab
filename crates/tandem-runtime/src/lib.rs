//! tandem-runtime: sampling, chat templates and generation on top of tandem-models.
pub mod chat;
pub mod generate;
pub mod grammar;
pub mod sampling;
pub mod speculative;

pub use chat::{parse_tool_calls, ChatTemplate, FunctionCall, Message, ToolCall};
pub use generate::{generate, FinishReason, GenerateOptions, Generation, GenerationStats, TextStream};
pub use grammar::{Grammar, GrammarSpec, Grammars};
pub use sampling::{InvalidParam, SampledToken, Sampler, SamplingParams, Target, MAX_TEMPERATURE};
