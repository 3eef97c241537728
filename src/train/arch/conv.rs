//! 2-D convolution layer. On the CPU it runs as im2col + gemm ([`super::im2col`]), whose
//! backward is several times faster than candle's; elsewhere (CUDA) it uses candle's conv2d.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::im2col::conv2d_im2col;

/// Which implementation runs the encoder's layers on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvBackend {
    /// candle's stock ops: `conv2d` (its CPU backward is slow), batch norm and ReLU from
    /// primitives. The plain-candle baseline of benchmarks.
    Candle,
    /// The custom CPU ops: im2col + gemm convolution, fused batch norm, one-pass ReLUs.
    Im2col,
}

static DEFAULT_BACKEND: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

/// Sets the backend every [`Conv2d`] uses from now on (benchmarks compare the two). The default
/// is [`ConvBackend::Im2col`]; it applies to CPU tensors only.
pub fn set_default_backend(backend: ConvBackend) {
    DEFAULT_BACKEND.store(backend as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The backend [`Conv2d::forward`] uses on CPU tensors.
pub fn default_backend() -> ConvBackend {
    match DEFAULT_BACKEND.load(std::sync::atomic::Ordering::Relaxed) {
        0 => ConvBackend::Candle,
        _ => ConvBackend::Im2col,
    }
}

/// Square-kernel convolution without bias (batch norm follows every conv in a ResNet).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Kaiming-normal (fan-out, ReLU) initialisation, as torchvision's ResNet.
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        let fan_out = (out_channels * kernel * kernel) as f64;
        let init = Init::Randn { mean: 0.0, stdev: (2.0 / fan_out).sqrt() };
        let weight = vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", init)?;
        Ok(Self { weight, stride, padding })
    }

    /// The kernel, `[out_channels, in_channels, kernel, kernel]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn stride(&self) -> usize {
        self.stride
    }
    pub fn padding(&self) -> usize {
        self.padding
    }

    /// `x`: `[batch, in_channels, height, width]`. CPU f32/f64 tensors use the im2col op
    /// unless the backend is [`ConvBackend::Candle`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && default_backend() == ConvBackend::Im2col {
            conv2d_im2col(x, &self.weight, self.stride, self.padding)
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, 1)
        }
    }
}
