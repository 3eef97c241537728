//! Heads on top of the encoder: projection MLPs (SimCLR), predictors (BYOL, SimSiam) and
//! prototypes (SwAV).

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use contrastive_export::{Attr, GraphBuilder, Result as ExportResult};
use serde::{Deserialize, Serialize};

use contrastive_kernels::Backend;

use super::batch_norm::BatchNorm2d;

/// An MLP `dims[0] → dims[1] → … → dims[last]`: each hidden layer is Linear → BN → ReLU; the
/// last is Linear, optionally followed by a BN (SimSiam's projector ends with one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    pub dims: Vec<usize>,
    /// Batch norm after each hidden linear layer (SimCLR v2, BYOL) or not (MoCo v2).
    pub hidden_batch_norm: bool,
    pub output_batch_norm: bool,
}

impl MlpConfig {
    pub fn new(dims: &[usize]) -> Self {
        Self { dims: dims.to_vec(), hidden_batch_norm: true, output_batch_norm: false }
    }
    pub fn in_dim(&self) -> usize {
        self.dims[0]
    }
    pub fn out_dim(&self) -> usize {
        *self.dims.last().expect("an MLP has dimensions")
    }
}

#[derive(Debug, Clone)]
pub struct MlpLayer {
    pub linear: Linear,
    pub batch_norm: Option<BatchNorm2d>,
    pub relu: bool,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub layers: Vec<MlpLayer>,
}

impl Mlp {
    pub fn new(vb: VarBuilder, config: &MlpConfig, backend: Backend) -> Result<Self> {
        if config.dims.len() < 2 {
            candle_core::bail!("an MLP needs at least an input and an output size, got {:?}", config.dims)
        }
        let last = config.dims.len() - 2;
        let mut layers = Vec::new();
        for (i, pair) in config.dims.windows(2).enumerate() {
            let vb = vb.pp(format!("layer{}", i + 1));
            let hidden = i < last;
            let with_bn = if hidden { config.hidden_batch_norm } else { config.output_batch_norm };
            // A bias before batch norm is redundant.
            let linear = if with_bn {
                candle_nn::linear_no_bias(pair[0], pair[1], vb.pp("linear"))?
            } else {
                candle_nn::linear(pair[0], pair[1], vb.pp("linear"))?
            };
            let batch_norm = if with_bn { Some(BatchNorm2d::new(vb.pp("bn"), pair[1], backend)?) } else { None };
            layers.push(MlpLayer { linear, batch_norm, relu: hidden });
        }
        Ok(Self { layers })
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.layers {
            h = layer.linear.forward(&h)?;
            h = match &layer.batch_norm {
                Some(bn) => batch_norm_1d(bn, &h, train, layer.relu)?,
                None if layer.relu => h.relu()?,
                None => h,
            };
        }
        Ok(h)
    }
}

impl Mlp {
    /// The MLP in evaluation mode as ONNX nodes (`Gemm`, `BatchNormalization`, `Relu`), values
    /// named `{name}.layerK.*`.
    pub fn to_onnx(&self, g: &mut GraphBuilder, input: &str, name: &str) -> ExportResult<String> {
        let mut h = input.to_string();
        for (i, layer) in self.layers.iter().enumerate() {
            let prefix = format!("{name}.layer{}", i + 1);
            h = linear_to_onnx(&layer.linear, g, &h, &format!("{prefix}.linear"))?;
            if let Some(bn) = &layer.batch_norm {
                h = bn.to_onnx(g, &h, &format!("{prefix}.bn"))?;
            }
            if layer.relu {
                h = g.node("Relu", &[&h], &format!("{prefix}.relu"), &[])?;
            }
        }
        Ok(h)
    }
}

/// `y = x·Wᵀ + b` as an ONNX `Gemm` with `transB = 1` (candle stores `W` as `[out, in]`).
fn linear_to_onnx(linear: &Linear, g: &mut GraphBuilder, input: &str, name: &str) -> ExportResult<String> {
    let weight = g.tensor(&format!("{name}.weight"), linear.weight())?;
    let bias = match linear.bias() {
        Some(bias) => g.tensor(&format!("{name}.bias"), bias)?,
        None => String::new(),
    };
    g.node("Gemm", &[input, &weight, &bias], name, &[("transB", Attr::Int(1))])
}

/// Batch norm (then ReLU if asked, fused) of `[N, D]` features, as a `[N, D, 1, 1]` image batch.
fn batch_norm_1d(bn: &BatchNorm2d, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let x = x.reshape((n, d, 1, 1))?;
    let y = if relu { bn.forward_t_relu(&x, train)? } else { bn.forward_t(&x, train)? };
    y.reshape((n, d))
}

/// SwAV's prototypes: `K` learnable vectors, kept on the unit sphere, that score normalised
/// features by cosine similarity.
#[derive(Debug, Clone)]
pub struct Prototypes {
    pub weight: candle_core::Var,
}

impl Prototypes {
    pub fn new(vb: VarBuilder, count: usize, dim: usize) -> Result<Self> {
        let weight = vb.get_with_hints((count, dim), "weight", candle_nn::init::DEFAULT_KAIMING_UNIFORM)?;
        let prototypes = Self { weight: candle_core::Var::from_tensor(&weight)? };
        prototypes.normalize()?;
        Ok(prototypes)
    }

    /// `[N, D]` normalised features → `[N, K]` cosine scores.
    pub fn scores(&self, z: &Tensor) -> Result<Tensor> {
        z.matmul(&self.weight.as_tensor().t()?)
    }

    /// Projects every prototype back onto the unit sphere (SwAV does this before each step).
    pub fn normalize(&self) -> Result<()> {
        let w = self.weight.as_tensor().detach();
        self.weight.set(&contrastive_kernels::l2_normalize(&w)?)
    }
}

/// DINO's last layer: a weight-normalised linear map without bias, `y = x · (V / ‖V‖)ᵀ` with
/// each output's row of `V` normalised (Salimans & Kingma 2016 with the gain fixed at 1, DINO's
/// `norm_last_layer`), so that the temperatures alone set the scale of the logits.
#[derive(Debug, Clone)]
pub struct WeightNormLinear {
    /// `V`, `[out, in]`.
    pub direction: Tensor,
}

impl WeightNormLinear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let direction =
            vb.get_with_hints((out_dim, in_dim), "direction", candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 })?;
        Ok(Self { direction })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&contrastive_kernels::l2_normalize(&self.direction)?.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn mlp_layers_follow_the_config() -> anyhow::Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let mlp = Mlp::new(vb, &MlpConfig::new(&[128, 128, 64]), Backend::Fused)?;
        assert_eq!(mlp.layers.len(), 2);
        assert!(mlp.layers[0].batch_norm.is_some() && mlp.layers[0].relu);
        assert!(mlp.layers[1].batch_norm.is_none() && !mlp.layers[1].relu);
        let y = mlp.forward_t(&Tensor::randn(0f32, 1., (4, 128), &Device::Cpu)?, true)?;
        assert_eq!(y.dims(), &[4, 64]);
        Ok(())
    }

    /// Each output is the dot product with a unit row, whatever the row's length: rows (3, 4)
    /// and (0, −2) give (0.6, 0.8) and (0, −1).
    #[test]
    fn weight_norm_linear_scores_with_unit_rows() -> anyhow::Result<()> {
        let layer = WeightNormLinear { direction: Tensor::new(&[[3f32, 4.], [0., -2.]], &Device::Cpu)? };
        let y = layer.forward(&Tensor::new(&[[1f32, 1.], [2., 0.]], &Device::Cpu)?)?.to_vec2::<f32>()?;
        let expected = [[1.4, -1.0], [1.2, 0.0]];
        for (row, want) in y.iter().zip(expected) {
            for (a, b) in row.iter().zip(want) {
                assert!((a - b).abs() < 1e-6, "{y:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn prototypes_stay_on_the_unit_sphere() -> anyhow::Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let p = Prototypes::new(vb, 5, 3)?;
        p.weight.set(&Tensor::new(&[[3f32, 4., 0.]; 5], &Device::Cpu)?)?;
        p.normalize()?;
        let w = p.weight.as_tensor().to_vec2::<f32>()?;
        assert!((w[0][0] - 0.6).abs() < 1e-6 && (w[0][1] - 0.8).abs() < 1e-6);
        Ok(())
    }
}
