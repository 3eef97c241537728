//! 2-D batch normalisation with running statistics (Ioffe & Szegedy 2015). Training with
//! [`Backend::Fused`] on the CPU runs the fused op of [`contrastive_kernels`]; elsewhere it is
//! written with candle primitives.

use candle_core::{Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};
use contrastive_export::{Attr, GraphBuilder, Result as ExportResult};
use contrastive_kernels::{Backend, BatchStatistics};

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
    backend: Backend,
}

impl BatchNorm2d {
    /// Scale 1, shift 0, running mean 0 and variance 1, as PyTorch.
    pub fn new(vb: VarBuilder, channels: usize, backend: Backend) -> Result<Self> {
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
            backend,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
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

    pub(super) fn forward_with_activation(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if train && self.backend.fused_on(x) {
            let (y, stats) = contrastive_kernels::batch_norm_train(x, &self.weight, &self.bias, self.eps, relu)?;
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
    pub(super) fn update_running_statistics(&self, stats: &BatchStatistics) -> Result<()> {
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
        let bn = BatchNorm2d::new(vb, channels, Backend::Fused).unwrap();
        (varmap, bn)
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
}
