//! Training-mode batch norm (Ioffe & Szegedy 2015, "Batch Normalization") as one CPU op with
//! its own backward, optionally followed by a ReLU in the same pass.
//!
//! Written with candle primitives, batch norm costs a dozen full-tensor passes forward and more
//! backward (transposed copies, broadcasts, reductions, candle's four-pass ReLU backward). Here,
//! for `x: [N, C, …]` and `M = N·(product of the trailing dims)` values per channel:
//!
//! ```text
//! forward:   μ = Σx/M,  σ² = Σ(x−μ)²/M,  x̂ = (x−μ)/√(σ²+ε),  y = γ·x̂ + β   [then max(0, y)]
//! backward:  g = dy [· 1(y>0)],  dβ = Σg,  dγ = Σ g·x̂,
//!            dx = γ/√(σ²+ε) · (g − dβ/M − x̂·dγ/M)
//! ```
//!
//! Each direction is one statistics pass (parallel over channels, sums in f64) and one
//! element-wise pass (parallel over images). f32 and f64, CPU only.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Per-channel batch statistics of one forward pass, and what its backward needs.
#[derive(Debug, Clone)]
pub struct BatchStatistics {
    /// Batch mean per channel.
    pub mean: Vec<f64>,
    /// Biased batch variance per channel (divided by `count`).
    pub variance: Vec<f64>,
    /// Values per channel, `M`.
    pub count: usize,
    inv_std: Vec<f64>,
    gamma: Vec<f64>,
}

/// `[N, C, rest…]` viewed as `N` images of `C` rows of `plane` values.
#[derive(Debug, Clone, Copy)]
struct ChannelLayout {
    images: usize,
    channels: usize,
    plane: usize,
}

impl ChannelLayout {
    fn new(dims: &[usize]) -> Result<Self> {
        if dims.len() < 2 {
            bail!("batch norm expects [N, C, ...], got shape {dims:?}")
        }
        Ok(Self { images: dims[0], channels: dims[1], plane: dims[2..].iter().product() })
    }

    fn count(&self) -> usize {
        self.images * self.plane
    }

    /// The `plane` values of channel `c` in image `n`.
    fn row<'a, T>(&self, data: &'a [T], n: usize, c: usize) -> &'a [T] {
        &data[(n * self.channels + c) * self.plane..][..self.plane]
    }
}

/// Sums of `a − shift` and `(a − shift)²` over a row, in 16 independent lanes so that the
/// compiler vectorises them; returned in f64.
fn shifted_sums<T: WithDType>(row: &[T], shift: T) -> (f64, f64) {
    const LANES: usize = 16;
    let zero = T::from_f64(0.0);
    let (mut sum, mut sum_sq) = ([zero; LANES], [zero; LANES]);
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for i in 0..LANES {
            let d = chunk[i] - shift;
            sum[i] += d;
            sum_sq[i] += d * d;
        }
    }
    let (mut s, mut ss) = (0f64, 0f64);
    for &a in tail {
        let d = (a - shift).to_f64();
        s += d;
        ss += d * d;
    }
    (s + sum.iter().map(|v| v.to_f64()).sum::<f64>(), ss + sum_sq.iter().map(|v| v.to_f64()).sum::<f64>())
}

/// Sums of `g` and `g·(x − mean)` over a row, where `g = dy` masked by `y > 0` when `y` is
/// given (the fused ReLU), in 16 vectorisable lanes.
fn gradient_sums<T: WithDType>(x: &[T], relu_output: Option<&[T]>, dy: &[T], mean: T) -> (f64, f64) {
    const LANES: usize = 16;
    let zero = T::from_f64(0.0);
    let (mut sum, mut sum_dot) = ([zero; LANES], [zero; LANES]);
    let mut add = |lane: usize, x: T, g: T| {
        sum[lane] += g;
        sum_dot[lane] += g * (x - mean);
    };
    // Whole 16-lane chunks (vectorised), then the tail in lane order.
    let whole = x.len() / LANES * LANES;
    match relu_output {
        Some(y) => {
            let mask = |y: T, dy: T| if y > zero { dy } else { zero };
            for ((x, y), dy) in
                x[..whole].chunks_exact(LANES).zip(y[..whole].chunks_exact(LANES)).zip(dy[..whole].chunks_exact(LANES))
            {
                for lane in 0..LANES {
                    add(lane, x[lane], mask(y[lane], dy[lane]));
                }
            }
            for i in whole..x.len() {
                add(i - whole, x[i], mask(y[i], dy[i]));
            }
        }
        None => {
            for (x, dy) in x[..whole].chunks_exact(LANES).zip(dy[..whole].chunks_exact(LANES)) {
                for lane in 0..LANES {
                    add(lane, x[lane], dy[lane]);
                }
            }
            for i in whole..x.len() {
                add(i - whole, x[i], dy[i]);
            }
        }
    }
    (sum.iter().map(|v| v.to_f64()).sum(), sum_dot.iter().map(|v| v.to_f64()).sum())
}

/// A `len`-element vector whose `chunk`-sized pieces `write` fills in parallel, each element
/// exactly once, without zeroing it first (a full pass saved on every output).
fn par_build<T: WithDType>(len: usize, chunk: usize, write: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, piece)| write(i, piece));
    // SAFETY: callers write every element of every piece (the pieces tile 0..len).
    unsafe { out.set_len(len) };
    out
}

fn batch_statistics<T: WithDType>(layout: ChannelLayout, x: &[T], gamma: &[T], eps: f64) -> BatchStatistics {
    let count = layout.count();
    let (mean, variance): (Vec<f64>, Vec<f64>) = (0..layout.channels)
        .into_par_iter()
        .map(|c| {
            if count == 0 {
                return (0.0, 0.0);
            }
            // Sums around the channel's first value keep E[x²] − E[x]² from cancelling.
            let shift = layout.row(x, 0, c)[0];
            let (sum, sum_sq) = (0..layout.images)
                .map(|n| shifted_sums(layout.row(x, n, c), shift))
                .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            let shifted_mean = sum / count as f64;
            (shift.to_f64() + shifted_mean, (sum_sq / count as f64 - shifted_mean * shifted_mean).max(0.0))
        })
        .unzip();
    let inv_std = variance.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    BatchStatistics { mean, variance, count, inv_std, gamma: gamma.iter().map(|g| g.to_f64()).collect() }
}

/// `y = max?(0, x·scale + shift)` per channel.
fn normalise<T: WithDType>(layout: ChannelLayout, x: &[T], scale: &[T], shift: &[T], relu: bool) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let (image_len, plane) = ((layout.channels * layout.plane).max(1), layout.plane.max(1));
    par_build(x.len(), image_len, |n, y_image| {
        let x_image = &x[n * image_len..][..y_image.len()];
        for (c, (y_row, x_row)) in y_image.chunks_mut(plane).zip(x_image.chunks(plane)).enumerate() {
            let (a, b) = (scale[c], shift[c]);
            if relu {
                y_row.iter_mut().zip(x_row).for_each(|(y, &x)| {
                    let v = x * a + b;
                    y.write(if v > zero { v } else { zero });
                });
            } else {
                y_row.iter_mut().zip(x_row).for_each(|(y, &x)| {
                    y.write(x * a + b);
                });
            }
        }
    })
}

fn forward<T: WithDType>(
    layout: ChannelLayout,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: f64,
    relu: bool,
) -> (Vec<T>, BatchStatistics) {
    let stats = batch_statistics(layout, x, gamma, eps);
    let scale: Vec<f64> = (0..layout.channels).map(|c| stats.gamma[c] * stats.inv_std[c]).collect();
    let shift: Vec<T> =
        (0..layout.channels).map(|c| T::from_f64(beta[c].to_f64() - stats.mean[c] * scale[c])).collect();
    let scale: Vec<T> = scale.into_iter().map(T::from_f64).collect();
    (normalise(layout, x, &scale, &shift, relu), stats)
}

/// `(dx, dγ, dβ)` from the forward's statistics.
fn backward<T: WithDType>(
    layout: ChannelLayout,
    stats: &BatchStatistics,
    x: &[T],
    y: &[T],
    dy: &[T],
    relu: bool,
) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    let (d_beta, sum_dot): (Vec<f64>, Vec<f64>) = (0..layout.channels)
        .into_par_iter()
        .map(|c| {
            let mean = T::from_f64(stats.mean[c]);
            (0..layout.images)
                .map(|n| {
                    gradient_sums(layout.row(x, n, c), relu.then(|| layout.row(y, n, c)), layout.row(dy, n, c), mean)
                })
                .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
        })
        .unzip();
    let d_gamma: Vec<f64> = sum_dot.iter().zip(&stats.inv_std).map(|(s, i)| s * i).collect();
    // dx = k_dy·g + k_x·x + k_1 per channel (the formula in the module docs, expanded).
    let m = layout.count().max(1) as f64;
    let mut coefficients = Vec::with_capacity(layout.channels);
    for c in 0..layout.channels {
        let (inv_std, mean) = (stats.inv_std[c], stats.mean[c]);
        let k_dy = stats.gamma[c] * inv_std;
        let k_x = -k_dy * inv_std * d_gamma[c] / m;
        let k_1 = -k_dy * d_beta[c] / m - k_x * mean;
        coefficients.push((T::from_f64(k_dy), T::from_f64(k_x), T::from_f64(k_1)));
    }
    let zero = T::from_f64(0.0);
    let (image_len, plane) = ((layout.channels * layout.plane).max(1), layout.plane.max(1));
    let dx = par_build(x.len(), image_len, |n, dx_image| {
        let start = n * image_len;
        let (x_image, y_image, dy_image) =
            (&x[start..][..dx_image.len()], &y[start..][..dx_image.len()], &dy[start..][..dx_image.len()]);
        for (c, dx_row) in dx_image.chunks_mut(plane).enumerate() {
            let (k_dy, k_x, k_1) = coefficients[c];
            let row = c * plane..c * plane + dx_row.len();
            let (x_row, y_row, dy_row) = (&x_image[row.clone()], &y_image[row.clone()], &dy_image[row]);
            if relu {
                for (d, ((&x, &y), &dy)) in dx_row.iter_mut().zip(x_row.iter().zip(y_row).zip(dy_row)) {
                    d.write(k_dy * if y > zero { dy } else { zero } + k_x * x + k_1);
                }
            } else {
                for (d, (&x, &dy)) in dx_row.iter_mut().zip(x_row.iter().zip(dy_row)) {
                    d.write(k_dy * dy + k_x * x + k_1);
                }
            }
        }
    });
    (dx, d_gamma, d_beta)
}

fn contiguous<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => bail!("fused batch norm: {what} must be contiguous"),
    }
}

/// Forward op on `(x, γ, β)`; shares its statistics with the caller (running averages) and
/// with its own backward.
struct BatchNormTrain {
    eps: f64,
    relu: bool,
    statistics: Arc<Mutex<Option<BatchStatistics>>>,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "fused-batch-norm-train"
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
        let x = contiguous_storage(s1, l1, "input")?;
        let (y, stats) = train_forward_storage(x, l1.dims(), (s2, l2), (s3, l3), self.eps, self.relu)?;
        *self.statistics.lock().expect("batch-norm statistics lock") = Some(stats);
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.statistics.lock().expect("batch-norm statistics lock").clone() else {
            bail!("fused batch norm: backward called before forward")
        };
        let (dx, d_gamma, d_beta) = train_backward(x, y, dy, stats, self.relu)?;
        let channels = d_gamma.len();
        let d_gamma = Tensor::from_vec(d_gamma, channels, x.device())?.to_dtype(gamma.dtype())?;
        let d_beta = Tensor::from_vec(d_beta, channels, x.device())?.to_dtype(beta.dtype())?;
        Ok((Some(dx), Some(d_gamma), Some(d_beta)))
    }
}

/// A contiguous storage's elements as a storage-typed slice view: `(storage, start, end)`.
type StorageView<'a> = (&'a CpuStorage, usize, usize);

fn contiguous_storage<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<StorageView<'a>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok((storage, start, end)),
        None => bail!("fused batch norm: {what} must be contiguous"),
    }
}

/// The training forward on CPU storages: `x` (shape `dims`, a contiguous view) and `γ`, `β`
/// (contiguous, one value per channel, the same float dtype as `x`).
pub(crate) fn train_forward_storage(
    (x, start, end): StorageView,
    dims: &[usize],
    (gamma, l_gamma): (&CpuStorage, &Layout),
    (beta, l_beta): (&CpuStorage, &Layout),
    eps: f64,
    relu: bool,
) -> Result<(CpuStorage, BatchStatistics)> {
    fn run<T: WithDType>(
        layout: ChannelLayout,
        x: &[T],
        gamma: &[T],
        beta: &[T],
        eps: f64,
        relu: bool,
    ) -> Result<(Vec<T>, BatchStatistics)> {
        if gamma.len() != layout.channels || beta.len() != layout.channels {
            bail!(
                "batch norm: input has {} channels but weight and bias have {} and {}",
                layout.channels,
                gamma.len(),
                beta.len()
            )
        }
        Ok(forward(layout, x, gamma, beta, eps, relu))
    }
    let layout = ChannelLayout::new(dims)?;
    Ok(match (x, gamma, beta) {
        (CpuStorage::F32(x), CpuStorage::F32(_), CpuStorage::F32(_)) => {
            let (y, stats) = run(
                layout,
                &x[start..end],
                contiguous(gamma, l_gamma, "weight")?,
                contiguous(beta, l_beta, "bias")?,
                eps,
                relu,
            )?;
            (CpuStorage::F32(y), stats)
        }
        (CpuStorage::F64(x), CpuStorage::F64(_), CpuStorage::F64(_)) => {
            let (y, stats) = run(
                layout,
                &x[start..end],
                contiguous(gamma, l_gamma, "weight")?,
                contiguous(beta, l_beta, "bias")?,
                eps,
                relu,
            )?;
            (CpuStorage::F64(y), stats)
        }
        _ => bail!(
            "fused batch norm supports f32 or f64 with one dtype for input, weight and bias, got {:?}, {:?}, {:?}",
            x.dtype(),
            gamma.dtype(),
            beta.dtype()
        ),
    })
}

/// The training backward: `(dx, dγ, dβ)` from the forward's input `x`, output `y`, statistics,
/// and the output gradient `dy`.
pub(crate) fn train_backward(
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    stats: BatchStatistics,
    relu: bool,
) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    let parameter_grads = Arc::new(Mutex::new(None));
    let grad_op = BatchNormTrainGrad { relu, stats, parameter_grads: parameter_grads.clone() };
    let dx = x.contiguous()?.apply_op3_no_bwd(&y.contiguous()?, &dy.contiguous()?, &grad_op)?;
    let Some((d_gamma, d_beta)) = parameter_grads.lock().expect("batch-norm gradient lock").take() else {
        bail!("fused batch norm: gradient op produced no parameter gradients")
    };
    Ok((dx, d_gamma, d_beta))
}

/// `dx` from `(x, y, dy)`; leaves `(dγ, dβ)` in `parameter_grads`.
struct BatchNormTrainGrad {
    relu: bool,
    stats: BatchStatistics,
    parameter_grads: ParameterGrads,
}

/// `(dγ, dβ)`, handed out of the gradient op beside its tensor result.
type ParameterGrads = Arc<Mutex<Option<(Vec<f64>, Vec<f64>)>>>;

impl BatchNormTrainGrad {
    fn run<T: WithDType>(&self, lx: &Layout, x: &[T], y: &[T], dy: &[T]) -> Result<Vec<T>> {
        let layout = ChannelLayout::new(lx.dims())?;
        if y.len() != x.len() || dy.len() != x.len() {
            bail!(
                "fused batch norm backward: input, output and gradient sizes differ ({}, {}, {})",
                x.len(),
                y.len(),
                dy.len()
            )
        }
        let (dx, d_gamma, d_beta) = backward(layout, &self.stats, x, y, dy, self.relu);
        *self.parameter_grads.lock().expect("batch-norm gradient lock") = Some((d_gamma, d_beta));
        Ok(dx)
    }
}

impl CustomOp3 for BatchNormTrainGrad {
    fn name(&self) -> &'static str {
        "fused-batch-norm-train-grad"
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
        let dx = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(self.run(
                l1,
                contiguous(s1, l1, "input")?,
                contiguous(s2, l2, "output")?,
                contiguous(s3, l3, "gradient")?,
            )?),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(self.run(
                l1,
                contiguous(s1, l1, "input")?,
                contiguous(s2, l2, "output")?,
                contiguous(s3, l3, "gradient")?,
            )?),
            _ => bail!(
                "fused batch norm backward supports f32 or f64, got {:?}, {:?}, {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        };
        Ok((dx, l1.shape().clone()))
    }
}

/// Training-mode batch norm of `x: [N, C, …]` with batch statistics, `[max(0, ·)]` when `relu`,
/// as one op with its own backward; also returns the batch statistics (for running averages).
/// CPU, f32 or f64 (`x`, `gamma`, `beta` of one dtype).
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStatistics)> {
    if !x.device().is_cpu() {
        bail!("fused batch norm runs on the CPU only, got {:?}", x.device())
    }
    let statistics = Arc::new(Mutex::new(None));
    let op = BatchNormTrain { eps, relu, statistics: statistics.clone() };
    let y = x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let stats = statistics.lock().expect("batch-norm statistics lock").clone();
    match stats {
        Some(stats) => Ok((y, stats)),
        None => bail!("fused batch norm: forward produced no statistics"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{batch_norm_reference, max_abs_diff, randn};
    use candle_core::{DType, Device, Var};

    /// Values, statistics and gradients (of `Σ y·r` for random `r`) against the textbook formula.
    fn compare_with_reference(dims: &[usize], relu: bool, dtype: DType, tolerance: f64) {
        let c = dims[1];
        // Non-trivial γ and β; x with a large mean to exercise the shifted sums.
        let gamma = Var::from_tensor(&randn(0.0, 1.0, c, dtype)).unwrap();
        let beta = Var::from_tensor(&randn(0.0, 1.0, c, dtype)).unwrap();
        let x = Var::from_tensor(&randn(3.0, 2.0, dims, dtype)).unwrap();
        let (actual, stats) = batch_norm_train(&x, &gamma, &beta, 1e-5, relu).unwrap();
        let (expected, mean, variance) = batch_norm_reference(&x, &gamma, &beta, 1e-5, relu);
        let case = format!("{dims:?} relu {relu} {dtype:?}");
        assert_eq!(actual.dims(), dims, "{case}");
        let error = max_abs_diff(&actual, &expected);
        assert!(error < tolerance, "{case}: value error {error}");
        let count: usize = dims.iter().product::<usize>() / c;
        assert_eq!(stats.count, count, "{case}");
        for (a, e) in stats.mean.iter().zip(&mean).chain(stats.variance.iter().zip(&variance)) {
            assert!((a - e).abs() < tolerance, "{case}: statistics {a} vs {e}");
        }

        let probe = randn(0.0, 1.0, dims, dtype);
        let actual_grads = (&actual * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let expected_grads = (&expected * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("input", &x), ("weight", &gamma), ("bias", &beta)] {
            let error = max_abs_diff(actual_grads.get(var).unwrap(), expected_grads.get(var).unwrap());
            assert!(error < tolerance, "{case}: {name} gradient error {error}");
        }
    }

    #[test]
    fn training_matches_primitive_formula_in_values_and_gradients() {
        for dims in [&[3, 4, 5, 6][..], &[2, 3, 7, 7], &[1, 2, 3, 5], &[16, 5, 1, 1], &[6, 3]] {
            for relu in [false, true] {
                compare_with_reference(dims, relu, DType::F64, 1e-10);
                compare_with_reference(dims, relu, DType::F32, 2e-4);
            }
        }
    }

    /// Central differences of `Σ bn(x)·r` (f64) for every input, scale and shift entry.
    #[test]
    fn gradients_match_finite_differences() {
        let device = Device::Cpu;
        let dims = (3, 2, 2, 3);
        let gamma = Var::new(&[1.5f64, -0.7], &device).unwrap();
        let beta = Var::new(&[0.2f64, 0.3], &device).unwrap();
        let x = Var::randn(0f64, 1.0, dims, &device).unwrap();
        let probe = Tensor::randn(0f64, 1.0, dims, &device).unwrap();
        let loss = |x: &Tensor, g: &Tensor, b: &Tensor| {
            (batch_norm_train(x, g, b, 1e-5, false).unwrap().0 * &probe).unwrap().sum_all().unwrap()
        };
        let grads = loss(&x, &gamma, &beta).backward().unwrap();
        let h = 1e-5;
        for which in 0..3 {
            let var = [&x, &gamma, &beta][which];
            let analytic = grads.get(var).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let values = var.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in 0..values.len() {
                let at = |delta: f64| {
                    let mut v = values.clone();
                    v[i] += delta;
                    let t = Tensor::from_vec(v, var.shape(), &device).unwrap();
                    let mut args = [x.as_tensor().clone(), gamma.as_tensor().clone(), beta.as_tensor().clone()];
                    args[which] = t;
                    loss(&args[0], &args[1], &args[2]).to_scalar::<f64>().unwrap()
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (numeric - analytic[i]).abs() < 1e-7,
                    "argument {which} entry {i}: {numeric} vs {}",
                    analytic[i]
                );
            }
        }
    }

    #[test]
    fn rejects_integer_input() {
        let x = Tensor::zeros((2, 2, 2, 2), DType::U32, &Device::Cpu).unwrap();
        let gamma = Tensor::ones(2, DType::U32, &Device::Cpu).unwrap();
        let message = batch_norm_train(&x, &gamma, &gamma, 1e-5, false).unwrap_err().to_string();
        assert!(message.contains("f32 or f64"), "{message}");
    }
}
