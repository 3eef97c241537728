//! What the kernels' tests share: random tensors, a difference measure, and batch norm written
//! as the textbook formula from candle primitives (autograd through every step), independent of
//! the fused op.

use candle_core::{DType, Device, Shape, Tensor, D};

pub fn randn(mean: f64, std: f64, shape: impl Into<Shape>, dtype: DType) -> Tensor {
    Tensor::randn(mean, std, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// `γ·(x − μ)/√(σ² + ε) + β` (then ReLU) with batch statistics over every axis but the
/// channel axis 1; returns the output, the batch means and the biased batch variances.
pub fn batch_norm_reference(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> (Tensor, Vec<f64>, Vec<f64>) {
    let c = x.dim(1).unwrap();
    let xt = x.transpose(0, 1).unwrap().flatten_from(1).unwrap();
    let mean = xt.mean_keepdim(D::Minus1).unwrap();
    let centred = xt.broadcast_sub(&mean).unwrap();
    let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let normalised = centred.broadcast_div(&(var.clone() + eps).unwrap().sqrt().unwrap()).unwrap();
    let y = normalised
        .broadcast_mul(&gamma.reshape((c, 1)).unwrap())
        .unwrap()
        .broadcast_add(&beta.reshape((c, 1)).unwrap())
        .unwrap();
    let mut dims = x.dims().to_vec();
    dims.swap(0, 1);
    let y = y.reshape(dims).unwrap().transpose(0, 1).unwrap();
    let y = if relu { y.relu().unwrap() } else { y };
    let as_f64 = |t: Tensor| t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    (y, as_f64(mean), as_f64(var))
}
