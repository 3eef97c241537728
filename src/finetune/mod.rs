//! Remote supervised-contrastive fine-tune jobs: datasets, the job store, the runner.

pub mod datasets;
pub mod store;
