//! A convolution whose gradients are a forward convolution and a matrix product, for devices
//! where candle's `conv2d` forward is fast (cuDNN on CUDA) and its backward is not: candle
//! computes the input gradient with `conv_transpose2d`, which runs a naive kernel on CUDA even
//! with the `cudnn` feature.
//!
//! For y = x ⋆ w with stride s, padding p and a k × k kernel (output H_out × W_out of an H × W
//! input), the input gradient is a stride-1 convolution:
//!
//!   dx[i] = Σ_t dy_s[i + p − t] · w[t]
//!
//! where dy_s is dy with s − 1 zeros between neighbours, padded by k − 1 − p before and
//! H + p − (H_out − 1)·s − 1 after (likewise along the width), and w is flipped in both spatial
//! axes with its two channel axes swapped. The weight gradient is one matrix product of dy with
//! the input's k² shifted windows (im2col).
//!
//! The forward value is candle's `conv2d` of the detached operands; a custom op that passes it
//! through unchanged carries the two gradients, so the op runs on any device.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// Convolution of `x` (`N × c_in × h × w`) with `w` (`c_out × c_in × k × k`), no bias, no
/// dilation, whose input gradient is a forward convolution and whose weight gradient is one
/// matrix product (see the module's documentation). Needs `padding < k`.
pub fn conv2d_gradients_by_forward(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let k = w.dim(2)?;
    if padding >= k || stride == 0 {
        bail!("conv2d_gradients_by_forward: needs padding < kernel and stride ≥ 1, got padding {padding}, kernel {k}, stride {stride}")
    }
    let y = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?.contiguous()?;
    y.apply_op3(x, w, GradientsByForward { stride, padding })
}

/// Passes its first operand through; its backward gives the convolution gradients of the other
/// two.
struct GradientsByForward {
    stride: usize,
    padding: usize,
}

impl GradientsByForward {
    fn pass_through<S: BackendStorage>(&self, storage: &S, layout: &Layout) -> Result<(S, Shape)> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            bail!("{}: the convolution's output must be contiguous", self.name())
        }
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }
}

impl CustomOp3 for GradientsByForward {
    fn name(&self) -> &'static str {
        "conv2d-gradients-by-forward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.pass_through(s1, l1)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.pass_through(s1, l1)
    }

    fn bwd(
        &self,
        _y: &Tensor,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (s, p) = (self.stride, self.padding);
        let (_, _, h, width) = x.dims4()?;
        let k = w.dim(2)?;
        let (_, _, h_out, w_out) = dy.dims4()?;
        let dilated = dilate(dy, s)?;
        let padded = dilated.pad_with_zeros(2, k - 1 - p, h + p - (h_out - 1) * s - 1)?.pad_with_zeros(
            3,
            k - 1 - p,
            width + p - (w_out - 1) * s - 1,
        )?;
        let rotated = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        let dx = padded.conv2d(&rotated, 0, 1, 1, 1)?;
        Ok((None, Some(dx), Some(weight_gradient(x, dy, k, s, p)?)))
    }
}

/// dW[o, i, a, b] = Σ_{n,y,x} dy[n, o, y, x] · x_p[n, i, y·s + a, x·s + b] (x_p: x padded by p):
/// the k² shifted, strided windows of x_p stacked as the rows of one matrix (im2col), then one
/// matrix product with dy. candle's own formula, a convolution with dy as a H_out × W_out kernel,
/// ran at about 2 TFLOP/s in cuDNN on an H200 and took half of a SimCLR step's GPU time.
fn weight_gradient(x: &Tensor, dy: &Tensor, k: usize, s: usize, p: usize) -> Result<Tensor> {
    let (n, c_in, _, _) = x.dims4()?;
    let (_, c_out, h_out, w_out) = dy.dims4()?;
    // s − 1 more zeros after, so that every window of s·H_out rows fits.
    let padded = x.pad_with_zeros(2, p, p + s - 1)?.pad_with_zeros(3, p, p + s - 1)?;
    let window = |a: usize, b: usize| -> Result<Tensor> {
        let rows = padded.narrow(2, a, s * h_out)?;
        let rows = if s == 1 { rows } else { rows.reshape((n, c_in, h_out, s, ()))?.narrow(3, 0, 1)?.squeeze(3)? };
        let cells = rows.narrow(3, b, s * w_out)?;
        if s == 1 {
            Ok(cells)
        } else {
            cells.reshape((n, c_in, h_out, w_out, s))?.narrow(4, 0, 1)?.squeeze(4)
        }
    };
    let windows = (0..k * k).map(|ab| window(ab / k, ab % k)).collect::<Result<Vec<_>>>()?;
    // (k², N, C_in, H_out, W_out) → (C_in, k², N, H_out, W_out) → rows ci·k² + a·k + b.
    let columns = Tensor::stack(&windows, 0)?
        .permute((2, 0, 1, 3, 4))?
        .contiguous()?
        .reshape((c_in * k * k, n * h_out * w_out))?;
    let dy = dy.transpose(0, 1)?.contiguous()?.reshape((c_out, n * h_out * w_out))?;
    dy.matmul(&columns.t()?)?.reshape((c_out, c_in, k, k))
}

/// `dy` (`N × C × H × W`) with `s − 1` zeros between neighbours along both spatial axes:
/// `N × C × ((H − 1)·s + 1) × ((W − 1)·s + 1)`.
fn dilate(dy: &Tensor, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(dy.clone());
    }
    let (n, c, h, w) = dy.dims4()?;
    let spaced = |t: &Tensor, axis: usize| -> Result<Tensor> {
        let zeros = t.zeros_like()?;
        let mut parts = vec![t.clone()];
        parts.extend(std::iter::repeat_n(zeros, s - 1));
        Tensor::stack(&parts, axis + 1)
    };
    let columns = spaced(dy, 3)?.reshape((n, c, h, w * s))?.narrow(3, 0, (w - 1) * s + 1)?;
    let w_dilated = (w - 1) * s + 1;
    spaced(&columns, 2)?.reshape((n, c, h * s, w_dilated))?.narrow(2, 0, (h - 1) * s + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, randn};
    use candle_core::{DType, Device, Var};

    /// Values and both gradients against candle's own `conv2d` (whose input gradient is
    /// `conv_transpose2d`), for the ResNet's shapes: 3×3 stride 1 and 2, 1×1 stride 2, odd sizes.
    #[test]
    fn agrees_with_candle_conv2d() {
        let cases = [
            ((2, 3, 8, 8), 4, 3, 1, 1),
            ((2, 3, 8, 8), 4, 3, 2, 1),
            ((2, 3, 7, 9), 5, 3, 2, 1),
            ((3, 4, 7, 7), 2, 1, 2, 0),
            ((1, 2, 6, 5), 3, 3, 1, 0),
            ((2, 2, 9, 9), 3, 5, 3, 2),
        ];
        for ((n, c, h, w), c_out, k, stride, padding) in cases {
            let x = Var::from_tensor(&randn(0.0, 1.0, (n, c, h, w), DType::F64)).unwrap();
            let kernel = Var::from_tensor(&randn(0.0, 1.0, (c_out, c, k, k), DType::F64)).unwrap();
            let ours = conv2d_gradients_by_forward(&x, &kernel, stride, padding).unwrap();
            let theirs = x.conv2d(&kernel, padding, stride, 1, 1).unwrap();
            let label = format!("{:?} k{k} s{stride} p{padding}", (n, c, h, w));
            assert_eq!(ours.dims(), theirs.dims(), "{label}");
            assert!(max_abs_diff(&ours, &theirs) < 1e-12, "{label}: values");
            let probe = randn(0.0, 1.0, ours.dims(), DType::F64);
            let g_ours = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (var, what) in [(&x, "input"), (&kernel, "kernel")] {
                let (a, b) = (g_ours.get(var).unwrap(), g_theirs.get(var).unwrap());
                assert!(max_abs_diff(a, b) < 1e-10, "{label}: {what} gradient differs by {}", max_abs_diff(a, b));
            }
        }
    }

    /// The input gradient against central finite differences of Σ y·r, by hand: no candle
    /// backward involved.
    #[test]
    fn input_gradient_matches_finite_differences() {
        let (stride, padding) = (2, 1);
        let x = randn(0.0, 1.0, (1, 2, 5, 5), DType::F64);
        let kernel = randn(0.0, 1.0, (3, 2, 3, 3), DType::F64);
        let probe = randn(0.0, 1.0, (1, 3, 3, 3), DType::F64);
        let objective = |x: &Tensor| -> f64 {
            let y = x.conv2d(&kernel, padding, stride, 1, 1).unwrap();
            (y * &probe).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let xv = Var::from_tensor(&x).unwrap();
        let y = conv2d_gradients_by_forward(&xv, &kernel, stride, padding).unwrap();
        let grads = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let analytic = grads.get(&xv).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let values = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-6;
        for (i, &g) in analytic.iter().enumerate() {
            let shifted = |delta: f64| {
                let mut v = values.clone();
                v[i] += delta;
                Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap()
            };
            let numeric = (objective(&shifted(eps)) - objective(&shifted(-eps))) / (2.0 * eps);
            assert!((numeric - g).abs() < 1e-6, "element {i}: {numeric} vs {g}");
        }
    }

    /// On a GPU (a build with the `cuda` feature and a device present; skipped elsewhere): the
    /// values and both gradients equal candle's conv2d on the CPU, in f32, for the ResNet's shapes.
    #[test]
    fn on_a_gpu_agrees_with_the_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("skipped: no CUDA device (a build with the `cuda` feature on a machine with a GPU runs it)");
            return;
        };
        for (dims, c_out, k, stride, padding) in [((8, 32, 28, 28), 64, 3, 2, 1), ((8, 32, 14, 14), 32, 3, 1, 1)] {
            let x = randn(0.0, 1.0, dims, DType::F32);
            let w = randn(0.0, 0.1, (c_out, dims.1, k, k), DType::F32);
            let (x_cpu, w_cpu) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let (x_gpu, w_gpu) = (
                Var::from_tensor(&x.to_device(&gpu).unwrap()).unwrap(),
                Var::from_tensor(&w.to_device(&gpu).unwrap()).unwrap(),
            );
            let y_cpu = x_cpu.conv2d(&w_cpu, padding, stride, 1, 1).unwrap();
            let y_gpu = conv2d_gradients_by_forward(&x_gpu, &w_gpu, stride, padding).unwrap();
            let probe = randn(0.0, 1.0, y_cpu.dims(), DType::F32);
            let g_cpu = (&y_cpu * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_gpu = (&y_gpu * &probe.to_device(&gpu).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            let relative = |a: &Tensor, b: &Tensor| {
                let a = a.to_device(&Device::Cpu).unwrap();
                max_abs_diff(&a, b) / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64
            };
            let label = format!("{dims:?} k{k} s{stride}");
            assert!(relative(&y_gpu, &y_cpu) < 1e-4, "{label}: values");
            assert!(relative(g_gpu.get(&x_gpu).unwrap(), g_cpu.get(&x_cpu).unwrap()) < 1e-4, "{label}: input gradient");
            assert!(
                relative(g_gpu.get(&w_gpu).unwrap(), g_cpu.get(&w_cpu).unwrap()) < 1e-4,
                "{label}: kernel gradient"
            );
            eprintln!("{label}: GPU = CPU within 1e-4 (relative) in values and both gradients");
        }
    }

    #[test]
    fn dilation_by_hand() {
        let dy = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let got = dilate(&dy, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, [1., 0., 2., 0., 0., 0., 3., 0., 4.]);
    }

    #[test]
    fn padding_as_wide_as_the_kernel_is_refused() {
        let x = randn(0.0, 1.0, (1, 1, 4, 4), DType::F32);
        let w = randn(0.0, 1.0, (1, 1, 1, 1), DType::F32);
        let err = conv2d_gradients_by_forward(&x, &w, 1, 1).unwrap_err().to_string();
        assert!(err.contains("padding < kernel"), "{err}");
    }
}
