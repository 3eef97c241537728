//! 1. Sample-pair construction: which samples are positives and negatives of each other.
