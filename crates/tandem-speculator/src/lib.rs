//! tandem-speculator: the drafter learns from the traffic it serves.
//!
//! The engine records traces (target hidden states, the target's distribution, accepted and
//! rejected drafts) into a bounded buffer; [`OnlineTrainer`] runs beside serving in the same
//! process, trains a copy of the EAGLE drafter on them ([`Trainer`]: candle autograd, AdamW), and
//! publishes numbered versions that the engine swaps in between steps (rolling back one that
//! lowers acceptance). `tandem train-drafter` runs the same trainer over traces spilled to disk, or over text the
//! target reads beforehand ([`distill`]).
pub mod adam;
pub mod distill;
pub mod loss;
pub mod online;
pub mod pool;
pub mod replay;
pub mod sampled;
pub mod traces_io;
pub mod trainer;

pub use online::{OnlineTrainer, OnlineTrainerConfig, TrainerHandle};
pub use pool::{Batch, TracePool};
pub use replay::Replay;
pub use trainer::{StepStats, TrainConfig, Trainer};
