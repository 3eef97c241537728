//! 1. Sample-pair construction: which samples are positives and negatives of each other.
//!
//! The methods build a [`Contrast`] (anchors, candidates, positive and denominator weights); the
//! pair strategies (`--pairs`, [`PairStrategy`]) rewrite it before the loss scores it.

pub mod contrast;
pub mod feature_transform;
pub mod fnc;
pub mod in_batch;
pub mod k_positives;
pub mod labels;
pub mod memory_bank;
pub mod mixco;
pub mod mixup;
pub mod mochi;
pub mod multi_view;
pub mod nnclr;
pub mod queue;
pub mod strategy;

pub use contrast::{Contrast, Denominator, Scores};
pub use feature_transform::transform_features;
pub use fnc::cancel_false_negatives;
pub use in_batch::view_labels;
pub use k_positives::k_positive_mask;
pub use labels::label_positive_mask;
pub use memory_bank::MemoryBank;
pub use mixco::Mixing;
pub use mixup::add_hardest_mixed_negatives;
pub use mochi::mix_hard_negatives;
pub use multi_view::sobel_edges;
pub use nnclr::NearestNeighbourSupport;
pub use queue::MemoryQueue;
pub use strategy::{PairPipeline, PairStrategy};
