//! 2-D batch normalisation with running statistics (Ioffe & Szegedy 2015). Training on the CPU
//! runs the fused op of [`super::fused_batch_norm`]; elsewhere (and with
//! [`ConvBackend::Candle`]) it is written with candle primitives.

use candle_core::{Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};
use contrastive_export::{Attr, GraphBuilder, Result as ExportResult};

use super::conv::{default_backend, ConvBackend};
use super::fused_batch_norm::{batch_norm_train, BatchStatistics};

/// Batch norm over the channel axis of NCHW tensors. Training uses the batch statistics and
/// updates the running ones (PyTorch's momentum 0.1, unbiased running variance); evaluation uses
/// the running ones.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    /// Scale 1, shift 0, running mean 0 and variance 1, as PyTorch.
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        Ok(Self {
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    /// The per-channel scale γ.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The per-channel shift β.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }
    /// Running average of the unbiased batch variance.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Evaluation mode as a per-channel affine map `x·scale + shift`, with
    /// `scale = γ/√(σ²_running + ε)` and `shift = β − μ_running·scale` (what conv folding needs).
    pub fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let scale = (self.weight() / (self.running_var() + self.eps)?.sqrt()?)?;
        let shift = (self.bias() - self.running_mean() * &scale)?;
        Ok((scale, shift))
    }

    /// Emits an ONNX `BatchNormalization` node (evaluation mode) over `[N, C, …]`.
    pub fn to_onnx(&self, g: &mut GraphBuilder, input: &str, name: &str) -> ExportResult<String> {
        let scale = g.tensor(&format!("{name}.weight"), self.weight())?;
        let bias = g.tensor(&format!("{name}.bias"), self.bias())?;
        let mean = g.tensor(&format!("{name}.running_mean"), self.running_mean())?;
        let var = g.tensor(&format!("{name}.running_var"), self.running_var())?;
        g.node(
            "BatchNormalization",
            &[input, &scale, &bias, &mean, &var],
            name,
            &[("epsilon", Attr::Float(self.eps as f32))],
        )
    }

    /// `γ·(x − μ)/√(σ² + ε) + β` over `x: [N, C, …]`, with batch statistics (and a running-average
    /// update) when `train`, running statistics otherwise.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with_activation(x, train, false)
    }

    /// `max(0, forward_t(x, train))`: the ReLU runs inside the batch-norm pass (and its
    /// backward) in training on the CPU, which saves several full-tensor passes.
    pub fn forward_t_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with_activation(x, train, true)
    }

    fn forward_with_activation(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if train && x.device().is_cpu() && default_backend() == ConvBackend::Im2col {
            let (y, stats) = batch_norm_train(x, &self.weight, &self.bias, self.eps, relu)?;
            self.update_running_statistics(&stats)?;
            return Ok(y);
        }
        let y = self.forward_primitive(x, train)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    /// `running ← (1 − momentum)·running + momentum·batch`, with the unbiased batch variance.
    pub(crate) fn update_running_statistics(&self, stats: &BatchStatistics) -> Result<()> {
        let n = stats.count as f64;
        let unbiased: Vec<f64> = stats.variance.iter().map(|v| v * n / (n - 1.0).max(1.0)).collect();
        let m = self.momentum;
        for (running, batch) in [(&self.running_mean, &stats.mean), (&self.running_var, &unbiased)] {
            let running_now = running.as_tensor();
            let batch = Tensor::from_slice(batch, batch.len(), running_now.device())?.to_dtype(running_now.dtype())?;
            running.set(&((running_now * (1.0 - m))? + (batch * m)?)?)?;
        }
        Ok(())
    }

    /// The same normalisation written with candle primitives (any device).
    fn forward_primitive(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = x.dim(1)?;
        let (mean, var) = if train {
            // Statistics over N and the spatial dims for each channel.
            let xt = x.transpose(0, 1)?.flatten_from(1)?; // [C, N*H*W]
            let mean = xt.mean_keepdim(D::Minus1)?;
            let centred = xt.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
            let (mean, var) = (mean.flatten_all()?, var.flatten_all()?);
            let n = xt.dim(1)? as f64;
            let unbiased = (var.detach() * (n / (n - 1.0).max(1.0)))?;
            let m = self.momentum;
            self.running_mean.set(&((self.running_mean.as_tensor() * (1.0 - m))? + (mean.detach() * m)?)?)?;
            self.running_var.set(&((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?)?;
            (mean, var)
        } else {
            (self.running_mean.as_tensor().clone(), self.running_var.as_tensor().clone())
        };
        let mut shape = vec![1; x.rank()];
        shape[1] = c;
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        let scale = (&self.weight * &inv_std)?;
        let shift = (&self.bias - (&mean * &scale)?)?;
        x.broadcast_mul(&scale.reshape(shape.as_slice())?)?.broadcast_add(&shift.reshape(shape.as_slice())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn layer(channels: usize, dtype: DType) -> (VarMap, BatchNorm2d) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let bn = BatchNorm2d::new(vb, channels).unwrap();
        (varmap, bn)
    }

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

    /// Batch norm with batch statistics written from primitive candle ops (autograd through
    /// every step): the textbook formula, independent of the fused op.
    fn reference(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64, relu: bool) -> Tensor {
        let c = x.dim(1).unwrap();
        let xt = x.transpose(0, 1).unwrap().flatten_from(1).unwrap();
        let mean = xt.mean_keepdim(D::Minus1).unwrap();
        let centred = xt.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normalised = centred.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap();
        let y = normalised
            .broadcast_mul(&gamma.reshape((c, 1)).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape((c, 1)).unwrap())
            .unwrap();
        let mut dims = x.dims().to_vec();
        dims.swap(0, 1);
        let y = y.reshape(dims).unwrap().transpose(0, 1).unwrap();
        if relu {
            y.relu().unwrap()
        } else {
            y
        }
    }

    /// Values and gradients (of `Σ y·r` for random `r`) of the layer against [`reference`].
    fn compare_with_reference(dims: &[usize], relu: bool, dtype: DType, tolerance: f64) {
        let device = Device::Cpu;
        let c = dims[1];
        let (_varmap, bn) = layer(c, dtype);
        // Non-trivial γ and β; x with a large mean to exercise the shifted sums.
        let gamma =
            Var::from_tensor(&(Tensor::randn(0f64, 1.0, c, &device).unwrap().to_dtype(dtype).unwrap())).unwrap();
        let beta = Var::from_tensor(&(Tensor::randn(0f64, 1.0, c, &device).unwrap().to_dtype(dtype).unwrap())).unwrap();
        let bn = BatchNorm2d { weight: gamma.as_tensor().clone(), bias: beta.as_tensor().clone(), ..bn };
        let x = Var::from_tensor(
            &((Tensor::randn(0f64, 2.0, dims, &device).unwrap() + 3.0).unwrap().to_dtype(dtype).unwrap()),
        )
        .unwrap();
        let actual = if relu { bn.forward_t_relu(&x, true).unwrap() } else { bn.forward_t(&x, true).unwrap() };
        let expected = reference(&x, &gamma, &beta, bn.eps(), relu);
        let case = format!("{dims:?} relu {relu} {dtype:?}");
        assert_eq!(actual.dims(), dims, "{case}");
        let error = max_abs_diff(&actual, &expected);
        assert!(error < tolerance, "{case}: value error {error}");

        let probe = Tensor::randn(0f64, 1.0, dims, &device).unwrap().to_dtype(dtype).unwrap();
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
        let (_varmap, bn) = layer(2, DType::F64);
        let gamma = Var::new(&[1.5f64, -0.7], &device).unwrap();
        let beta = Var::new(&[0.2f64, 0.3], &device).unwrap();
        let x = Var::randn(0f64, 1.0, dims, &device).unwrap();
        let probe = Tensor::randn(0f64, 1.0, dims, &device).unwrap();
        let loss = |x: &Tensor, g: &Tensor, b: &Tensor| {
            let bn = BatchNorm2d { weight: g.clone(), bias: b.clone(), ..bn.clone() };
            (bn.forward_t(x, true).unwrap() * &probe).unwrap().sum_all().unwrap()
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
    fn running_statistics_follow_pytorch_by_hand() {
        // One channel, values 1, 2, 3, 6: mean 3, unbiased variance (4+1+0+9)/3 = 14/3.
        let (_varmap, bn) = layer(1, DType::F32);
        let x = Tensor::new(&[1f32, 2., 3., 6.], &Device::Cpu).unwrap().reshape((2, 1, 1, 2)).unwrap();
        let y = bn.forward_t(&x, true).unwrap();
        let mean = bn.running_mean().to_vec1::<f32>().unwrap()[0];
        let var = bn.running_var().to_vec1::<f32>().unwrap()[0];
        assert!((mean - 0.3).abs() < 1e-6, "running mean {mean}");
        assert!((var - (0.9 + 0.1 * 14.0 / 3.0)).abs() < 1e-6, "running var {var}");
        // Biased variance 3.5 normalises the batch.
        let expected: Vec<f32> = [-2f32, -1., 0., 3.].iter().map(|d| d / (3.5f32 + 1e-5).sqrt()).collect();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in y.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "{y:?} vs {expected:?}");
        }
        // A second step averages again.
        bn.forward_t(&(x * 2.0).unwrap(), true).unwrap();
        let mean = bn.running_mean().to_vec1::<f32>().unwrap()[0];
        assert!((mean - (0.9 * 0.3 + 0.1 * 6.0)).abs() < 1e-6, "running mean {mean}");
    }

    #[test]
    fn evaluation_uses_running_statistics() {
        let (_varmap, bn) = layer(2, DType::F64);
        bn.running_mean.set(&Tensor::new(&[1f64, -2.], &Device::Cpu).unwrap()).unwrap();
        bn.running_var.set(&Tensor::new(&[4f64, 0.25], &Device::Cpu).unwrap()).unwrap();
        let x = Tensor::new(&[[3f64, 0.]], &Device::Cpu).unwrap().reshape((1, 2, 1, 1)).unwrap();
        let y = bn.forward_t(&x, false).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!((y[0] - 2.0 / (4.0f64 + 1e-5).sqrt()).abs() < 1e-12, "{y:?}");
        assert!((y[1] - 2.0 / (0.25f64 + 1e-5).sqrt()).abs() < 1e-12, "{y:?}");
        let y =
            bn.forward_t_relu(&(x * -1.0).unwrap(), false).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // Channel 0: (−3 − 1)/2 < 0 is cut; channel 1: (0 + 2)/0.5 passes.
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 2.0 / (0.25f64 + 1e-5).sqrt()).abs() < 1e-12, "{y:?}");
        // Evaluation leaves the running statistics alone.
        assert_eq!(bn.running_mean().to_vec1::<f64>().unwrap(), vec![1.0, -2.0]);
    }

    #[test]
    fn rejects_integer_input() {
        let (_varmap, bn) = layer(2, DType::F32);
        let x = Tensor::zeros((2, 2, 2, 2), DType::U32, &Device::Cpu).unwrap();
        let message = bn.forward_t(&x, true).unwrap_err().to_string();
        assert!(message.contains("f32 or f64"), "{message}");
    }
}
