//! 3. Architectures: encoders, heads, momentum updates.

pub mod batch_norm;
pub mod conv;
pub mod im2col;
