//! 1. Sample-pair construction: which samples are positives and negatives of each other.

pub mod in_batch;
pub mod k_positives;
pub mod labels;
pub mod queue;

pub use in_batch::view_labels;
pub use k_positives::k_positive_mask;
pub use labels::label_positive_mask;
pub use queue::MemoryQueue;
