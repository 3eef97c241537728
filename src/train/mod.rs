//! The trainer, one folder per layer of the survey's taxonomy.

pub mod arch;
pub mod augment;
pub mod loss;
pub mod optim;
pub mod pairs;
