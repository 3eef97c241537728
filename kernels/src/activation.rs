//! ReLU ops with a one-pass backward, for CPU training.
//!
//! candle's `relu` backward builds its mask with `zeros_like`, `ge` and `to_dtype` before the
//! multiply: four full-tensor passes. These ops compute `dx = dy·1(y > 0)` from the output in one
//! pass, and [`add_relu`] fuses a residual sum into the same op (`y = max(0, a + b)`, both
//! gradients `dy·1(y > 0)`; at exactly 0 the gradient is 0, as PyTorch, where candle passes it).
//! Other devices and dtypes fall back to candle's own ops.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Elements per parallel task: large enough to amortise scheduling, small enough to share work.
const CHUNK: usize = 1 << 16;

fn contiguous<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => bail!("relu op: operand must be contiguous"),
    }
}

/// `out[i] = f(a[i], b[i])` in parallel chunks, each output written once (no zeroing pass).
fn zip_map<T: WithDType>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let len = a.len().min(b.len());
    let mut out: Vec<T> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(
        |(out, (a, b))| {
            out.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| {
                o.write(f(a, b));
            });
        },
    );
    // SAFETY: the chunks tile 0..len and every element of each was written above.
    unsafe { out.set_len(len) };
    out
}

/// Runs `f32_fn`/`f64_fn` on two same-dtype contiguous CPU operands.
fn binary_float(
    name: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32_fn: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    f64_fn: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
) -> Result<(CpuStorage, Shape)> {
    if l1.shape() != l2.shape() {
        bail!("{name}: shapes differ, {:?} and {:?}", l1.shape(), l2.shape())
    }
    let out = match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(f32_fn(contiguous(s1, l1)?, contiguous(s2, l2)?)),
        (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(f64_fn(contiguous(s1, l1)?, contiguous(s2, l2)?)),
        _ => bail!("{name} supports f32 or f64 operands of one dtype, got {:?} and {:?}", s1.dtype(), s2.dtype()),
    };
    Ok((out, l1.shape().clone()))
}

fn masked<T: WithDType>(y: &[T], dy: &[T]) -> Vec<T> {
    let zero = T::from_f64(0.0);
    zip_map(y, dy, |y, dy| if y > zero { dy } else { zero })
}

/// `dy·1(y > 0)` from `(y, dy)`: the gradient of both ReLU ops.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        binary_float(self.name(), (s1, l1), (s2, l2), masked::<f32>, masked::<f64>)
    }
}

pub(crate) fn relu_grad(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    y.apply_op2_no_bwd(&dy.contiguous()?, &ReluGrad)
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu-one-pass-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(x: &[T]) -> Vec<T> {
            let zero = T::from_f64(0.0);
            zip_map(x, x, |x, _| if x > zero { x } else { zero })
        }
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(run::<f32>(contiguous(s, l)?)),
            CpuStorage::F64(_) => CpuStorage::F64(run::<f64>(contiguous(s, l)?)),
            _ => bail!("{} supports f32 or f64, got {:?}", self.name(), s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(relu_grad(y, dy)?))
    }
}

/// `max(0, a + b)` of two same-shape contiguous CPU operands (f32 or f64); `name` names the op
/// in errors.
pub(crate) fn add_relu_storage(
    name: &str,
    a: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    fn run<T: WithDType>(a: &[T], b: &[T]) -> Vec<T> {
        let zero = T::from_f64(0.0);
        zip_map(a, b, |a, b| {
            let s = a + b;
            if s > zero {
                s
            } else {
                zero
            }
        })
    }
    binary_float(name, a, b, run::<f32>, run::<f64>)
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        add_relu_storage(self.name(), (s1, l1), (s2, l2))
    }

    fn bwd(&self, _a: &Tensor, _b: &Tensor, y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = relu_grad(y, dy)?;
        Ok((Some(grad.clone()), Some(grad)))
    }
}

/// Whether the custom ops apply: CPU f32/f64.
fn is_cpu_float(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// `max(0, x)`; on CPU f32/f64 its backward is one pass (candle's takes four).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if is_cpu_float(x) {
        x.contiguous()?.apply_op1(Relu)
    } else {
        x.relu()
    }
}

/// `max(0, a + b)` (a residual connection's sum and ReLU) as one op on CPU f32/f64.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if is_cpu_float(a) && a.dtype() == b.dtype() && a.dims() == b.dims() {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        (a + b)?.relu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::{DType, Device, Var};

    #[test]
    fn relu_matches_candle_in_values_and_gradients() {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(
                &Tensor::randn(0f64, 1.0, (3, 4, 5, 7), &Device::Cpu).unwrap().to_dtype(dtype).unwrap(),
            )
            .unwrap();
            let probe = Tensor::randn(0f64, 1.0, (3, 4, 5, 7), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let (ours, theirs) = (relu(&x).unwrap(), x.relu().unwrap());
            assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert_eq!(max_abs_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()), 0.0);
        }
    }

    #[test]
    fn add_relu_matches_sum_then_relu() {
        let a = Var::randn(0f64, 1.0, (2, 3, 4, 4), &Device::Cpu).unwrap();
        let b = Var::randn(0f64, 1.0, (2, 3, 4, 4), &Device::Cpu).unwrap();
        let probe = Tensor::randn(0f64, 1.0, (2, 3, 4, 4), &Device::Cpu).unwrap();
        let ours = add_relu(&a, &b).unwrap();
        let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        assert!(max_abs_diff(&ours, &theirs) < 1e-15);
        let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for var in [&a, &b] {
            assert!(max_abs_diff(g1.get(var).unwrap(), g2.get(var).unwrap()) < 1e-15);
        }
    }

    #[test]
    fn hand_computed_gradient_of_add_relu() {
        let a = Var::new(&[1f32, -2., 0.5], &Device::Cpu).unwrap();
        let b = Var::new(&[1f32, 1., -1.], &Device::Cpu).unwrap();
        let y = add_relu(&a, &b).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![2., 0., 0.]);
        let grads = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(&a).unwrap().to_vec1::<f32>().unwrap(), vec![3., 0., 0.]);
        assert_eq!(grads.get(&b).unwrap().to_vec1::<f32>().unwrap(), vec![3., 0., 0.]);
    }
}
