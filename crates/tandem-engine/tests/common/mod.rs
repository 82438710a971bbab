//! Shared by the engine's integration tests: the tiny random checkpoints (tandem-testkit).
#![allow(dead_code)]

pub use tandem_testkit::tiny_dir;
