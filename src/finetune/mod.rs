//! Remote supervised-contrastive fine-tune jobs: the gRPC service, the job store, uploaded
//! datasets, the runner (the job system) and what one job does.

pub mod client;
pub mod datasets;
pub mod job;
pub mod parameters;
pub mod runner;
pub mod service;
pub mod store;
