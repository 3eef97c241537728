//! 2-D convolution layer. On the CPU it runs as im2col + gemm ([`super::im2col`]), whose
//! backward is several times faster than candle's; elsewhere (CUDA) it uses candle's conv2d.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use contrastive_export::{Attr, GraphBuilder, Result as ExportResult};

use super::batch_norm::BatchNorm2d;
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
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
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

    /// Emits this convolution as an ONNX `Conv` node named `name`, with the evaluation-mode
    /// batch norm that follows it folded into its kernel and bias when given.
    pub fn to_onnx(
        &self,
        g: &mut GraphBuilder,
        input: &str,
        name: &str,
        folded: Option<&BatchNorm2d>,
    ) -> ExportResult<String> {
        let (out_channels, _, kernel, _) = self.weight.dims4()?;
        let mut inputs = vec![input.to_string()];
        match folded {
            Some(bn) => {
                let (scale, shift) = bn.eval_affine()?;
                let weight = self.weight.broadcast_mul(&scale.reshape((out_channels, 1, 1, 1))?)?;
                inputs.push(g.tensor(&format!("{name}.weight"), &weight)?);
                inputs.push(g.tensor(&format!("{name}.bias"), &shift)?);
            }
            None => inputs.push(g.tensor(&format!("{name}.weight"), &self.weight)?),
        }
        let (k, s, p) = (kernel as i64, self.stride as i64, self.padding as i64);
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        g.node(
            "Conv",
            &inputs,
            name,
            &[
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![s, s])),
                ("pads", Attr::Ints(vec![p, p, p, p])),
            ],
        )
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
