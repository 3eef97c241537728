//! 3. Architectures: encoders, heads, momentum updates.

pub mod batch_norm;
pub mod conv;
