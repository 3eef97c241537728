//! CPC v2 for images (Hénaff et al. 2020, "Data-Efficient Image Recognition with Contrastive
//! Predictive Coding"; van den Oord et al. 2018): synchronous asymmetric.
//!
//! - patches: the view cut into a grid of half-overlapping patches (14×14 every 7 pixels: a
//!   3×3 grid on 28×28), each encoded by the encoder f into a code `z_{i,j}` (mean-pooled);
//! - context: a masked (causal) network g over the grid of codes ([`MaskedContext`]), so that
//!   `c_{i,j}` depends only on rows ≤ i;
//! - predictions: for each offset k = 1 … `prediction_steps`, a linear `W_k` predicts the code
//!   k rows below, `ẑ_{i+k,j} = W_k c_{i,j}`. Encoder and context network are different
//!   branches, both trained by gradient: asymmetric;
//! - pairs and loss: InfoNCE of each prediction against every patch code of the batch, the
//!   target patch its positive, all other patches of its own and of other images negatives:
//!   `ℓ = −log( e^{s(ẑ_{i+k,j}, z_{i+k,j})/τ} / Σ_{z'} e^{s(ẑ_{i+k,j}, z')/τ} )`, mean over all
//!   predictions; s is the cosine (the paper's dot product with a temperature, as the other
//!   methods here), or the run's instance loss.
//!
//! The served embedding is what CPC evaluates: the mean of the image's patch codes (the encoder
//! config carries the patch grid, [`crate::train::arch::ResNetConfig::patches`], so training,
//! evaluation and the exported ONNX graph all encode the same patches). The paper also
//! replaces batch norm by layer norm in the patch encoder; this one keeps the project's
//! ResNet, batch norm included.

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module};

use super::{Method, MethodConfig, MethodParts};
use crate::train::arch::context::MaskedContext;
use crate::train::arch::{Encoder, ResNet};
use crate::train::augment::patches::patch_grid;
use crate::train::pairs::Contrast;

pub struct Cpc {
    config: MethodConfig,
    encoder: Encoder,
    context: MaskedContext,
    /// `W_k` for k = 1 … prediction_steps.
    predictors: Vec<Linear>,
}

impl Cpc {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Cpc { context_layers, prediction_steps, .. } = &config else {
            candle_core::bail!("not a CPC config")
        };
        let grid = config.patch_grid();
        let Some(resnet) = parts.encoder.as_resnet() else {
            candle_core::bail!("cpc embeds images by a grid of ResNet patch codes: it needs --encoder resnet")
        };
        if resnet.patches != grid {
            candle_core::bail!(
                "cpc: the encoder must embed images by the method's patch grid {grid:?}, but its config has {:?}",
                resnet.patches
            )
        }
        if *prediction_steps == 0 {
            candle_core::bail!("cpc: prediction_steps must be at least 1")
        }
        let encoder = Encoder::new(parts.vb.pp("encoder"), parts.encoder, parts.backend)?;
        let dim = encoder.feature_dim();
        let context = MaskedContext::new(parts.vb.pp("context"), dim, *context_layers)?;
        let predictors = (1..=*prediction_steps)
            .map(|k| candle_nn::linear_no_bias(dim, dim, parts.vb.pp(format!("predictor{k}"))))
            .collect::<Result<_>>()?;
        Ok(Self { config, encoder, context, predictors })
    }

    fn resnet(&self) -> &ResNet {
        self.encoder.as_resnet().expect("CPC is built on a ResNet")
    }
}

impl Method for Cpc {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _indices: &[usize], _step: usize) -> Result<Tensor> {
        let MethodConfig::Cpc { temperature, patch, stride, loss, .. } = &self.config else {
            unreachable!("a CPC config")
        };
        let (patches, rows, columns) = patch_grid(&views[0], *patch, *stride)?;
        let (n, count, c, size, _) = patches.dims5()?;
        if rows <= self.predictors.len() {
            candle_core::bail!(
                "cpc: a grid of {rows} rows leaves no row to predict {} rows ahead; use fewer prediction_steps \
                 or a smaller patch stride",
                self.predictors.len()
            )
        }
        // Codes `[N·G, D]`, row-major within each image, and their grid `[N, D, R, C]`.
        let codes = self.resnet().pooled_t(&patches.reshape((n * count, c, size, size))?, true)?;
        let dim = codes.dim(1)?;
        let grid = codes.reshape((n, rows, columns, dim))?.permute((0, 3, 1, 2))?.contiguous()?;
        let context = self.context.forward(&grid)?.permute((0, 2, 3, 1))?; // [N, R, C, D]
        let mut predictions = Vec::new();
        let mut targets = Vec::new();
        for (step, predictor) in self.predictors.iter().enumerate() {
            let k = step + 1;
            let from = context.narrow(1, 0, rows - k)?.reshape(((), dim))?;
            predictions.push(predictor.forward(&from)?);
            targets.extend(prediction_targets(n, rows, columns, k));
        }
        let predictions = contrastive_kernels::l2_normalize(&Tensor::cat(&predictions, 0)?)?;
        let candidates = contrastive_kernels::l2_normalize(&codes)?;
        let anchors = predictions.dim(0)?;
        let targets = Tensor::new(targets, codes.device())?.unsqueeze(1)?;
        let all = Tensor::arange(0u32, (n * count) as u32, codes.device())?.unsqueeze(0)?;
        let positives = targets.broadcast_eq(&all)?.to_dtype(codes.dtype())?;
        let denominator = Tensor::ones((anchors, n * count), codes.dtype(), codes.device())?;
        loss.loss(&Contrast::new(predictions, candidates, positives, denominator), *temperature)
    }

    fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.encoder
    }
}

/// For the predictions k rows ahead from every position of rows 0 … R − k − 1 of `n` images
/// (image-major, then row-major, as the context rows are read), the index of the target code
/// among the `n·R·C` codes.
fn prediction_targets(n: usize, rows: usize, columns: usize, k: usize) -> Vec<u32> {
    let mut targets = Vec::with_capacity(n * (rows - k) * columns);
    for image in 0..n {
        for row in k..rows {
            targets.extend((0..columns).map(|col| (image * rows * columns + row * columns + col) as u32));
        }
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use crate::train::arch::methods::named_vars;
    use crate::train::arch::ResNetConfig;

    fn build(varmap: &VarMap, temperature: f64) -> Result<Cpc> {
        let mut config = MethodConfig::default_for("cpc").unwrap();
        if let MethodConfig::Cpc { temperature: t, .. } = &mut config {
            *t = temperature;
        }
        let encoder =
            ResNetConfig { widths: vec![4, 8, 8], patches: config.patch_grid(), ..ResNetConfig::canonical(1) }.into();
        let parts = MethodParts::for_test(varmap, &encoder);
        Cpc::new(config, &parts)
    }

    /// With τ → ∞ every logit is 0, so each prediction's loss is log(N·G): 2 images × 9 patches
    /// (the default 3×3 grid of 28×28).
    #[test]
    fn every_prediction_is_contrasted_with_every_patch_of_the_batch() -> Result<()> {
        let varmap = VarMap::new();
        let mut cpc = build(&varmap, 1e6)?;
        let views = vec![Tensor::randn(0f32, 1., (2, 1, 28, 28), &Device::Cpu)?; 2];
        let loss = cpc.loss(&views, &Tensor::zeros(2, DType::U32, &Device::Cpu)?, &[0, 1], 0)?;
        assert!((loss.to_scalar::<f32>()? - 18f32.ln()).abs() < 1e-4, "{loss} vs log 18");
        let mut cpc = build(&varmap, 0.2)?;
        let grads = cpc.loss(&views, &Tensor::zeros(2, DType::U32, &Device::Cpu)?, &[0, 1], 0)?.backward()?;
        for name in ["encoder.stem.conv.weight", "context.layer1.weight", "context.layer2.bias", "predictor1.weight"] {
            let var = named_vars(&varmap).into_iter().find(|(n, _)| n == name).expect(name).1;
            assert!(grads.get(var.as_tensor()).is_some(), "no gradient reached {name}");
        }
        Ok(())
    }

    /// Two images of a 3×2 grid (codes 0–5 and 6–11): one row ahead, positions (0, 0) … (1, 1)
    /// predict codes 2 … 5 of their image; two rows ahead, row 0 predicts row 2.
    #[test]
    fn predictions_target_the_code_k_rows_below() {
        assert_eq!(prediction_targets(2, 3, 2, 1), vec![2, 3, 4, 5, 8, 9, 10, 11]);
        assert_eq!(prediction_targets(2, 3, 2, 2), vec![4, 5, 10, 11]);
    }

    #[test]
    fn an_encoder_without_the_patch_grid_is_refused() {
        let varmap = VarMap::new();
        let encoder = ResNetConfig::canonical(1).into();
        let parts = MethodParts::for_test(&varmap, &encoder);
        let err = Cpc::new(MethodConfig::default_for("cpc").unwrap(), &parts).err().expect("refused").to_string();
        assert!(err.contains("patch grid"), "{err}");
    }
}
