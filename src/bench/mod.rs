//! Benchmarks (`contrastive bench …`): each prints the project's figure beside a baseline
//! measured in the same run, so the ratio holds on a shared, noisy machine. The server-process
//! harness is shared with the end-to-end tests.

pub mod cpu;
pub mod finetune;
pub mod serve;
pub mod server_process;
pub mod soak;
pub mod train;

pub use server_process::{ServerCommand, ServerProcess};
