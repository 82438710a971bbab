//! tandem-fleet: many tandem servers and trainers as one fleet, on existing distributed
//! software. Servers register with the SGLang Model Gateway (`gateway`), publish traces to a
//! NATS JetStream stream (`traces`), and take drafter versions from a JetStream object store
//! announced in a key-value entry (`drafters`), and share a Tinker client's sampler weights
//! (`weights`); `broker` names where everything lives.
pub mod broker;
pub mod drafters;
pub mod gateway;
pub mod traces;
pub mod weights;
