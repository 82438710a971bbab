//! The RL training service (Tinker API): training models inside the serving process, on the
//! served model's own weights, sampled through the same engine.
mod futures;
mod proto;
mod requests;
mod results;
mod routes;
mod service;

pub use routes::router;
pub use service::{TrainingConfig, TrainingLimits, TrainingService, WeightStore};
