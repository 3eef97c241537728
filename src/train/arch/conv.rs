//! 2-D convolution. (Initial version: candle's own conv2d; to be replaced by a fast im2col op.)

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Which implementation runs a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvBackend {
    /// candle's stock `conv2d` (its CPU backward is slow).
    Candle,
    /// im2col + gemm custom op on CPU.
    Im2col,
}

static DEFAULT_BACKEND: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

/// Sets the backend every [`Conv2d`] uses from now on (benchmarks compare the two).
pub fn set_default_backend(backend: ConvBackend) {
    DEFAULT_BACKEND.store(backend as u8, std::sync::atomic::Ordering::Relaxed);
}

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

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn stride(&self) -> usize {
        self.stride
    }
    pub fn padding(&self) -> usize {
        self.padding
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.padding, self.stride, 1, 1)
    }
}
