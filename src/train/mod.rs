//! The trainer: the survey's layers, one folder each ([`pairs`], [`augment`], [`arch`],
//! [`loss`]; the fifth, evaluation, is [`crate::eval`]), and around them the one training loop
//! ([`fit`]) that `contrastive train` ([`run`]) and fine-tune jobs share.

pub mod arch;
pub mod augment;
pub mod checkpoint;
pub mod config;
pub mod curves;
pub mod fit;
pub mod loader;
pub mod loss;
pub mod model;
pub mod optim;
pub mod pairs;
pub mod progress;
pub mod run;

pub use model::{EvalScope, Model};
