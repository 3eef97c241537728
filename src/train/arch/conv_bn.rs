//! Convolution → batch norm [→ ReLU] as one op in CPU training.
//!
//! Every tensor between two ops costs candle's backward a gradient buffer: `zeros_like`, then an
//! `add` of the incoming gradient (a fresh allocation and three passes over the tensor). A
//! ResNet's conv outputs feed only their batch norm, so here the conv output `z` stays inside
//! one op: the forward runs the im2col convolution then the fused batch norm
//! ([`super::fused_batch_norm`]), and the backward hands the batch norm's `dz` straight to the
//! convolution's gradient products. Same values and gradients as [`Conv2d::forward`] followed by
//! [`BatchNorm2d::forward_t`] (or `forward_t_relu`), which is also what runs in evaluation, on
//! other devices, or with [`ConvBackend::Candle`].

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};

use super::batch_norm::BatchNorm2d;
use super::conv::{default_backend, Conv2d, ConvBackend};
use super::fused_batch_norm::{train_backward, train_forward_storage, BatchStatistics};
use super::im2col::{conv_backward, conv_forward_storage, ConvGeometry};

/// `bn(conv(x))`, then `max(0, ·)` when `relu`; batch statistics and a running-average update
/// when `train`. Fused into one op in CPU training (f32/f64) with the im2col backend.
pub fn conv_bn_t(conv: &Conv2d, bn: &BatchNorm2d, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
    if !(train && x.device().is_cpu() && default_backend() == ConvBackend::Im2col) {
        let z = conv.forward(x)?;
        return if relu { bn.forward_t_relu(&z, train) } else { bn.forward_t(&z, train) };
    }
    // One operand for γ and β (custom ops take three); `cat` hands each its gradient back.
    let gamma_beta = Tensor::cat(&[bn.weight(), bn.bias()], 0)?;
    let saved = Arc::new(Mutex::new(None));
    let op = ConvBnTrain { stride: conv.stride(), padding: conv.padding(), eps: bn.eps(), relu, saved: saved.clone() };
    let y = x.contiguous()?.apply_op3(&conv.weight().contiguous()?, &gamma_beta, op)?;
    let saved = saved.lock().expect("conv-bn state lock");
    let Some(saved) = saved.as_ref() else { bail!("fused conv + batch norm: forward kept no statistics") };
    bn.update_running_statistics(&saved.stats)?;
    Ok(y)
}

/// What the backward needs from the forward: the conv output and its batch statistics.
struct Saved {
    conv_output: Tensor,
    stats: BatchStatistics,
}

/// The op on `(x, w, [γ; β])`.
struct ConvBnTrain {
    stride: usize,
    padding: usize,
    eps: f64,
    relu: bool,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl CustomOp3 for ConvBnTrain {
    fn name(&self) -> &'static str {
        "fused-conv-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeometry::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
        let channels = g.out_channels;
        if l3.shape().elem_count() != 2 * channels {
            bail!(
                "fused conv + batch norm: {} output channels but {} batch-norm parameters (expected γ and β)",
                channels,
                l3.shape().elem_count()
            )
        }
        let z = conv_forward_storage(&g, (s1, l1), (s2, l2))?;
        let output_shape = g.output_shape();
        let (gamma, beta) = (l3.narrow(0, 0, channels)?, l3.narrow(0, channels, channels)?);
        let (y, stats) = train_forward_storage(
            (&z, 0, output_shape.elem_count()),
            output_shape.dims(),
            (s3, &gamma),
            (s3, &beta),
            self.eps,
            self.relu,
        )?;
        let conv_output = match z {
            CpuStorage::F32(z) => Tensor::from_vec(z, output_shape.clone(), &Device::Cpu)?,
            CpuStorage::F64(z) => Tensor::from_vec(z, output_shape.clone(), &Device::Cpu)?,
            _ => bail!("fused conv + batch norm: the convolution returned neither f32 nor f64"),
        };
        *self.saved.lock().expect("conv-bn state lock") = Some(Saved { conv_output, stats });
        Ok((y, output_shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gamma_beta: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (conv_output, stats) = match self.saved.lock().expect("conv-bn state lock").as_ref() {
            Some(saved) => (saved.conv_output.clone(), saved.stats.clone()),
            None => bail!("fused conv + batch norm: backward called before forward"),
        };
        let (dz, d_gamma, d_beta) = train_backward(&conv_output, y, dy, stats, self.relu)?;
        let (dx, dw) = conv_backward(x, w, &dz, ConvGeometry::new(x.dims(), w.dims(), self.stride, self.padding)?)?;
        let d_gamma_beta = Tensor::from_vec([d_gamma, d_beta].concat(), gamma_beta.dims(), x.device())?
            .to_dtype(gamma_beta.dtype())?;
        Ok((dx, dw, Some(d_gamma_beta)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};
    use candle_nn::{VarBuilder, VarMap};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Two identical (conv, bn) pairs: one runs fused, the other as two ops.
    fn pairs(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        dtype: DType,
    ) -> (VarMap, [(Conv2d, BatchNorm2d); 2]) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let make = |name: &str| -> (Conv2d, BatchNorm2d) {
            (
                Conv2d::new(vb.pp(name).pp("conv"), c_in, c_out, kernel, stride, padding).unwrap(),
                BatchNorm2d::new(vb.pp(name).pp("bn"), c_out).unwrap(),
            )
        };
        let (a, b) = (make("fused"), make("separate"));
        // Same weights and a non-trivial γ, β in both.
        let w = Tensor::randn(0f64, 1.0, a.0.weight().shape(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let gamma = Tensor::randn(1f64, 0.5, c_out, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let beta = Tensor::randn(0f64, 0.5, c_out, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        for (conv, bn) in [&a, &b] {
            for (t, v) in [(conv.weight(), &w), (bn.weight(), &gamma), (bn.bias(), &beta)] {
                Var::from_tensor(t).unwrap().set(v).unwrap();
            }
        }
        (varmap, [a, b])
    }

    #[test]
    fn fused_equals_conv_then_batch_norm_in_values_gradients_and_running_stats() {
        let cases = [
            (3, 4, 3, 1, 1, (3, 3, 7, 6)),
            (2, 5, 3, 2, 1, (2, 2, 9, 9)),
            (4, 3, 1, 2, 0, (3, 4, 6, 6)),
            (1, 3, 3, 1, 0, (1, 1, 5, 5)),
        ];
        for (dtype, tolerance) in [(DType::F64, 1e-10), (DType::F32, 1e-3)] {
            for relu in [false, true] {
                for (c_in, c_out, kernel, stride, padding, dims) in cases {
                    let (_varmap, [fused, separate]) = pairs(c_in, c_out, kernel, stride, padding, dtype);
                    let x = Var::from_tensor(
                        &Tensor::randn(0f64, 1.0, dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap(),
                    )
                    .unwrap();
                    let a = conv_bn_t(&fused.0, &fused.1, &x, true, relu).unwrap();
                    let z = separate.0.forward(&x).unwrap();
                    let b = if relu {
                        separate.1.forward_t_relu(&z, true).unwrap()
                    } else {
                        separate.1.forward_t(&z, true).unwrap()
                    };
                    let case = format!("{dtype:?} relu {relu} {dims:?} -> {c_out} k{kernel} s{stride} p{padding}");
                    assert!(max_abs_diff(&a, &b) < tolerance, "{case}: values");
                    let probe = Tensor::randn(0f64, 1.0, a.shape(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                    let ga = (&a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let gb = (&b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let grad = |g: &candle_core::backprop::GradStore, t: &Tensor| g.get(t).unwrap().clone();
                    assert!(max_abs_diff(&grad(&ga, &x), &grad(&gb, &x)) < tolerance, "{case}: input gradient");
                    for (ta, tb, what) in [
                        (fused.0.weight(), separate.0.weight(), "kernel"),
                        (fused.1.weight(), separate.1.weight(), "γ"),
                        (fused.1.bias(), separate.1.bias(), "β"),
                        (fused.1.running_mean(), separate.1.running_mean(), "running mean"),
                        (fused.1.running_var(), separate.1.running_var(), "running variance"),
                    ] {
                        let (va, vb) = if what.starts_with("running") {
                            (ta.clone(), tb.clone())
                        } else {
                            (grad(&ga, ta), grad(&gb, tb))
                        };
                        assert!(max_abs_diff(&va, &vb) < tolerance, "{case}: {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn evaluation_falls_back_to_the_two_layers() {
        let (_varmap, [fused, _]) = pairs(2, 3, 3, 1, 1, DType::F32);
        let x = Tensor::randn(0f32, 1.0, (2, 2, 5, 5), &Device::Cpu).unwrap();
        let expected = fused.1.forward_t(&fused.0.forward(&x).unwrap(), false).unwrap();
        assert_eq!(max_abs_diff(&conv_bn_t(&fused.0, &fused.1, &x, false, false).unwrap(), &expected), 0.0);
    }
}
