//! The trainer, one folder per layer of the survey's taxonomy.

pub mod arch;
pub mod augment;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod curves;
pub mod loss;
pub mod optim;
pub mod pairs;
pub mod trainer;
