//! Convolution → batch norm [→ ReLU] as one op in CPU training.
//!
//! Every tensor between two ops costs candle's backward a gradient buffer: `zeros_like`, then an
//! `add` of the incoming gradient (a fresh allocation and three passes over the tensor). A
//! ResNet's conv outputs feed only their batch norm, so here the conv output `z` stays inside
//! one op: the forward runs the im2col convolution then the fused batch norm
//! ([`crate::batch_norm`]), and the backward hands the batch norm's `dz` straight to the
//! convolution's gradient products. Same values and gradients as [`crate::conv2d`] followed by
//! [`crate::batch_norm_train`].

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::batch_norm::{train_backward, train_forward_storage, BatchStatistics};
use crate::conv::{conv_backward, conv_forward_storage, storage_into_tensor, ConvGeometry};

/// `bn(conv(x, w))` with batch statistics, then `max(0, ·)` when `relu`, as one op. `γ` and `β`
/// hold one value per output channel. Returns the output and the batch statistics, from which
/// the caller updates its running averages. CPU tensors, f32 or f64.
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_train(
    x: &Tensor,
    w: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stride: usize,
    padding: usize,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStatistics)> {
    if !x.device().is_cpu() {
        bail!("fused conv + batch norm runs on the CPU only, got {:?}", x.device())
    }
    // One operand for γ and β (custom ops take three); `cat` hands each its gradient back.
    let gamma_beta = Tensor::cat(&[gamma, beta], 0)?;
    let saved = Arc::new(Mutex::new(None));
    let op = ConvBnTrain { stride, padding, eps, relu, saved: saved.clone() };
    let y = x.contiguous()?.apply_op3(&w.contiguous()?, &gamma_beta, op)?;
    let saved = saved.lock().expect("conv-bn state lock");
    let Some(saved) = saved.as_ref() else { bail!("fused conv + batch norm: forward kept no statistics") };
    Ok((y, saved.stats.clone()))
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
        let conv_output = storage_into_tensor(z, output_shape.clone())?;
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
    use crate::testing::{batch_norm_reference, max_abs_diff, randn};
    use candle_core::{DType, Var};

    #[test]
    fn fused_equals_candle_conv_then_textbook_batch_norm() {
        let cases = [
            (3, 4, 3, 1, 1, (3, 3, 7, 6)),
            (2, 5, 3, 2, 1, (2, 2, 9, 9)),
            (4, 3, 1, 2, 0, (3, 4, 6, 6)),
            (1, 3, 3, 1, 0, (1, 1, 5, 5)),
        ];
        for (dtype, tolerance) in [(DType::F64, 1e-10), (DType::F32, 1e-3)] {
            for relu in [false, true] {
                for (c_in, c_out, kernel, stride, padding, dims) in cases {
                    let x = Var::from_tensor(&randn(0.0, 1.0, dims, dtype)).unwrap();
                    let w = Var::from_tensor(&randn(0.0, 1.0, (c_out, c_in, kernel, kernel), dtype)).unwrap();
                    let gamma = Var::from_tensor(&randn(1.0, 0.5, c_out, dtype)).unwrap();
                    let beta = Var::from_tensor(&randn(0.0, 0.5, c_out, dtype)).unwrap();
                    let (a, stats) = conv_bn_train(&x, &w, &gamma, &beta, stride, padding, 1e-5, relu).unwrap();
                    let z = x.conv2d(&w, padding, stride, 1, 1).unwrap();
                    let (b, mean, variance) = batch_norm_reference(&z, &gamma, &beta, 1e-5, relu);
                    let case = format!("{dtype:?} relu {relu} {dims:?} -> {c_out} k{kernel} s{stride} p{padding}");
                    assert!(max_abs_diff(&a, &b) < tolerance, "{case}: values");
                    for (actual, expected, what) in
                        [(&stats.mean, &mean, "mean"), (&stats.variance, &variance, "variance")]
                    {
                        let error = actual.iter().zip(expected).map(|(a, e)| (a - e).abs()).fold(0.0, f64::max);
                        assert!(error < tolerance, "{case}: batch {what}");
                    }
                    let probe = randn(0.0, 1.0, a.shape(), dtype);
                    let ga = (&a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let gb = (&b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    for (var, what) in [(&x, "input"), (&w, "kernel"), (&gamma, "γ"), (&beta, "β")] {
                        let error = max_abs_diff(ga.get(var).unwrap(), gb.get(var).unwrap());
                        assert!(error < tolerance, "{case}: {what} gradient {error}");
                    }
                }
            }
        }
    }
}
