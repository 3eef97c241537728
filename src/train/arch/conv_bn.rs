//! A convolution followed by batch norm (and a ReLU where the network has one): the unit a
//! ResNet is built of. In CPU training with [`Backend::Fused`] the two run as one op
//! ([`contrastive_kernels::conv_bn_train`]), so candle's backward allocates no gradient buffer
//! for the convolution's output; in evaluation and export the batch norm folds into the
//! convolution.

use candle_core::{Result, Tensor};
use contrastive_export::{GraphBuilder, Result as ExportResult};
use contrastive_kernels::Backend;

use super::batch_norm::BatchNorm2d;
use super::conv::Conv2d;

#[derive(Debug, Clone)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
}

impl ConvBn {
    pub fn new(conv: Conv2d, bn: BatchNorm2d) -> Self {
        Self { conv, bn }
    }

    /// `bn(conv(x))`, then ReLU when `relu`; batch statistics and a running-average update when
    /// `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let fused = self.conv.backend() == Backend::Fused && self.bn.backend().fused_on(x);
        if train && fused {
            let (y, stats) = contrastive_kernels::conv_bn_train(
                x,
                self.conv.weight(),
                self.bn.weight(),
                self.bn.bias(),
                self.conv.stride(),
                self.conv.padding(),
                self.bn.eps(),
                relu,
            )?;
            self.bn.update_running_statistics(&stats)?;
            return Ok(y);
        }
        self.bn.forward_with_activation(&self.conv.forward(x)?, train, relu)
    }

    /// One ONNX `Conv` node named `name` with the evaluation-mode batch norm folded in:
    /// `W·γ/√(σ²+ε)` and `β − μ·γ/√(σ²+ε)`.
    pub fn to_onnx(&self, g: &mut GraphBuilder, input: &str, name: &str) -> ExportResult<String> {
        let (scale, shift) = self.bn.eval_affine()?;
        self.conv.to_onnx(g, input, name, Some((&scale, &shift)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    /// The fused training path and the primitive one agree in values, running statistics and
    /// gradients (the kernels crate tests the ops themselves against the formula).
    #[test]
    fn fused_and_candle_backends_agree() {
        let device = Device::Cpu;
        let build = |backend| {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F64, &device);
            let conv = Conv2d::new(vb.pp("conv"), 2, 3, 3, 2, 1, backend).unwrap();
            let bn = BatchNorm2d::new(vb.pp("bn"), 3, backend).unwrap();
            (varmap, ConvBn::new(conv, bn))
        };
        let (_fused_map, fused) = build(Backend::Fused);
        let (plain_map, plain) = build(Backend::Candle);
        plain_map.data().lock().unwrap()["conv.weight"].set(fused.conv.weight()).unwrap();
        let x = Var::randn(0f64, 1.0, (4, 2, 7, 7), &device).unwrap();
        let probe = Tensor::randn(0f64, 1.0, (4, 3, 4, 4), &device).unwrap();
        for relu in [false, true] {
            let a = fused.forward_t(&x, true, relu).unwrap();
            let b = plain.forward_t(&x, true, relu).unwrap();
            assert!(max_abs_diff(&a, &b) < 1e-10, "relu {relu}: values");
            let ga = (&a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_abs_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-10, "relu {relu}: input gradient");
            let (wa, wb) = (ga.get(fused.conv.weight()).unwrap(), gb.get(plain.conv.weight()).unwrap());
            assert!(max_abs_diff(wa, wb) < 1e-10, "relu {relu}: kernel gradient");
        }
        assert!(max_abs_diff(fused.bn.running_mean(), plain.bn.running_mean()) < 1e-12);
        assert!(max_abs_diff(fused.bn.running_var(), plain.bn.running_var()) < 1e-12);
        // Evaluation: the same function of the running statistics on both paths.
        let (a, b) = (fused.forward_t(&x, false, true).unwrap(), plain.forward_t(&x, false, true).unwrap());
        assert!(max_abs_diff(&a, &b) < 1e-10, "evaluation");
    }
}
