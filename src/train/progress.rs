//! How far training has come: what a checkpoint saves and what [`super::fit`] resumes from.

use serde::{Deserialize, Serialize};

/// How far a fit has come; checkpoints save it, and a fit resumes from it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Full epochs done.
    pub epoch: usize,
    /// Batches done inside `epoch` (non-zero only after an interruption).
    pub batch_in_epoch: usize,
    /// Optimiser steps done in total.
    pub step: usize,
    /// Training time so far, evaluation and hooks excluded.
    pub train_seconds: f64,
}
