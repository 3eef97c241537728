//! Remote supervised-contrastive fine-tune jobs: datasets, the job store, the runner.

pub mod client;
pub mod datasets;
pub mod runner;
pub mod service;
pub mod store;
