//! Training ops that candle's CPU backend lacks or runs slowly, as candle custom ops with their
//! own backward: im2col + matrix-product convolution ([`conv2d`]), batch norm with an optional
//! ReLU in one pass each way ([`batch_norm_train`]), the two fused into one op
//! ([`conv_bn_train`]), one-pass ReLUs ([`relu`], [`add_relu`]), and a ResNet's residual block
//! built of those as one op ([`residual_block_train`]). Each is tested against
//! candle's own ops in values and gradients (f32 and f64) and against finite differences.
//!
//! Layers choose them through a [`Backend`] value they are built with; on other devices and
//! dtypes the layers use candle's ops, except that convolutions on a GPU compute their gradients
//! by forward convolutions ([`conv2d_gradients_by_forward`]) rather than candle's naive
//! transposed convolution. [`l2_normalize`] is the row normalisation that losses,
//! pair strategies, evaluation and the exported graph all share.

mod activation;
mod batch_norm;
mod conv;
mod conv_bn;
mod conv_by_forward;
mod matmul_avx512;
mod norm;
mod residual_block;
#[cfg(test)]
mod testing;

pub use activation::{add_relu, relu};
pub use batch_norm::{batch_norm_train, BatchStatistics};
pub use conv::conv2d;
pub use conv_bn::conv_bn_train;
pub use conv_by_forward::conv2d_gradients_by_forward;
pub use norm::{l2_normalize, l2_normalize_slice, L2_EPS_SQUARED};
pub use residual_block::{residual_block_train, BlockStatistics, ConvBnLayer};

use candle_core::{DType, Tensor};

/// Which implementation the layers of an encoder run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// candle's stock ops: `conv2d` (whose CPU backward is slow), batch norm and ReLU written
    /// with primitives. The plain-candle baseline of benchmarks.
    Candle,
    /// The ops of this crate where they apply (CPU, f32 or f64); on other devices candle's,
    /// with convolution gradients by forward convolutions.
    #[default]
    Fused,
}

impl Backend {
    /// Whether this crate's ops should run on `x`.
    pub fn fused_on(self, x: &Tensor) -> bool {
        self == Backend::Fused && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
    }

    /// Whether a convolution of `x` should compute its gradients by forward convolutions: on a
    /// GPU, where candle's `conv2d` forward is fast and its backward is not.
    pub fn gradients_by_forward_on(self, x: &Tensor) -> bool {
        self == Backend::Fused && !x.device().is_cpu()
    }
}
