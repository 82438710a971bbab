//! tandem-train: training models inside the engine (LoRA or full weights), the policy losses of
//! the training API, AdamW, checkpoints and merged export.
pub mod loss;
pub mod memory;
pub mod model;

pub use loss::{ConfigValue, LossFn};
pub use model::{AdamParams, Datum, ForwardBackwardOutput, Limits, Mode, PassSize, TrainError, TrainingModel};
