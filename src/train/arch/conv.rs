//! 2-D convolution layer. With [`Backend::Fused`] it runs on the CPU as im2col + gemm
//! ([`contrastive_kernels::conv2d`]), whose backward is several times faster than candle's, and
//! on a GPU as candle's conv2d with gradients by forward convolutions
//! ([`contrastive_kernels::conv2d_gradients_by_forward`]); with [`Backend::Candle`] it is
//! candle's conv2d everywhere.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use contrastive_export::{Attr, GraphBuilder, Result as ExportResult};
use contrastive_kernels::Backend;

/// Square-kernel convolution without bias (batch norm follows every conv in a ResNet).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
    backend: Backend,
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
        backend: Backend,
    ) -> Result<Self> {
        let fan_out = (out_channels * kernel * kernel) as f64;
        let init = Init::Randn { mean: 0.0, stdev: (2.0 / fan_out).sqrt() };
        let weight = vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", init)?;
        Ok(Self { weight, stride, padding, backend })
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
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Emits this convolution as an ONNX `Conv` node named `name`. With `affine = (scale,
    /// shift)`, one value per output channel, the node computes `conv(x)·scale + shift` (how an
    /// evaluation-mode batch norm is folded into the convolution before it).
    pub fn to_onnx(
        &self,
        g: &mut GraphBuilder,
        input: &str,
        name: &str,
        affine: Option<(&Tensor, &Tensor)>,
    ) -> ExportResult<String> {
        let (out_channels, _, kernel, _) = self.weight.dims4()?;
        let mut inputs = vec![input.to_string()];
        match affine {
            Some((scale, shift)) => {
                let weight = self.weight.broadcast_mul(&scale.reshape((out_channels, 1, 1, 1))?)?;
                inputs.push(g.tensor(&format!("{name}.weight"), &weight)?);
                inputs.push(g.tensor(&format!("{name}.bias"), shift)?);
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

    /// `x`: `[batch, in_channels, height, width]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.backend.fused_on(x) {
            contrastive_kernels::conv2d(x, &self.weight, self.stride, self.padding)
        } else if self.backend.gradients_by_forward_on(x) && self.padding < self.weight.dim(2)? {
            contrastive_kernels::conv2d_gradients_by_forward(x, &self.weight, self.stride, self.padding)
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, 1)
        }
    }
}
