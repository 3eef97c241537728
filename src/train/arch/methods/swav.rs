//! SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
//! Assignments"): clustering.
//!
//! - encoder + projector shared by every view, then K learnable prototypes on the unit sphere;
//! - codes: Sinkhorn-Knopp on each global view's prototype scores (equal-partition constraint,
//!   no gradient);
//! - loss: swapped prediction — each view predicts the other views' codes from its own scores;
//!   with multi-crop (`local_crops`, 0 by default) the local crops predict both global views'
//!   codes and compute none ([`loss::swapped_prediction`]);
//! - prototypes are renormalised after each step and frozen for the first steps, as in the paper.

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::{Encoder, Prototypes};
use crate::train::loss;

/// The views that compute codes: the two global crops.
const GLOBAL_VIEWS: usize = 2;

pub struct Swav {
    config: MethodConfig,
    branch: Branch,
    prototypes: Prototypes,
}

impl Swav {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Swav { prototypes, .. } = config else { candle_core::bail!("not a SwAV config") };
        let projector = parts.projector_config();
        let branch = parts.branch(&projector)?;
        let prototypes = Prototypes::new(parts.vb.pp("prototypes"), prototypes, projector.out_dim())?;
        Ok(Self { config, branch, prototypes })
    }
}

impl Method for Swav {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _indices: &[usize], step: usize) -> Result<Tensor> {
        let MethodConfig::Swav { temperature, epsilon, sinkhorn_iterations, freeze_prototypes_steps, .. } = self.config
        else {
            unreachable!("built from a SwAV config")
        };
        let z = self.branch.project_views(views, true)?;
        let scores: Vec<Tensor> = z
            .iter()
            .map(|z| {
                let z = loss::l2_normalize(z)?;
                if step < freeze_prototypes_steps {
                    z.matmul(&self.prototypes.weight.as_tensor().detach().t()?)
                } else {
                    self.prototypes.scores(&z)
                }
            })
            .collect::<Result<_>>()?;
        // Only the two global views compute codes (the loader puts them first).
        let codes: Vec<Tensor> = scores[..GLOBAL_VIEWS]
            .iter()
            .map(|s| loss::sinkhorn_knopp(s, epsilon, sinkhorn_iterations))
            .collect::<Result<_>>()?;
        loss::swapped_prediction(&scores, &codes, temperature)
    }

    fn after_step(&mut self, _progress: f64) -> Result<()> {
        self.prototypes.normalize()
    }

    fn encoder(&self) -> &Encoder {
        &self.branch.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.branch.encoder
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use crate::train::arch::methods::{trainable_vars, MultiCrop};
    use crate::train::arch::{EncoderConfig, ResNetConfig};

    /// SwAV with two local crops, prototypes trained from the first step.
    fn build(varmap: &VarMap) -> Result<Swav> {
        let encoder: EncoderConfig = ResNetConfig { widths: vec![4, 8, 8], ..ResNetConfig::canonical(1) }.into();
        let parts = MethodParts::for_test(varmap, &encoder);
        let config = MethodConfig::Swav {
            prototypes: 5,
            temperature: 0.1,
            epsilon: 0.05,
            sinkhorn_iterations: 3,
            freeze_prototypes_steps: 0,
            multi_crop: MultiCrop { local_crops: 2, local_size: 4, local_scale: (0.05, 0.4) },
        };
        Swav::new(config, &parts)
    }

    /// Multi-crop: two 8×8 global views and two 4×4 local crops. The loss is the swapped
    /// prediction of all four views' scores against the two global views' codes (with codes
    /// from the local crops too it would differ), and every parameter learns, prototypes included.
    #[test]
    fn local_crops_predict_the_global_codes_and_compute_none() -> anyhow::Result<()> {
        let varmap = VarMap::new();
        let mut method = build(&varmap)?;
        let views: Vec<Tensor> = [8, 8, 4, 4]
            .iter()
            .map(|&side| Tensor::rand(0f32, 1f32, (6, 1, side, side), &Device::Cpu))
            .collect::<candle_core::Result<_>>()?;
        let labels = Tensor::zeros(6, DType::U32, &Device::Cpu)?;

        let scores: Vec<Tensor> = method
            .branch
            .project_views(&views, true)?
            .iter()
            .map(|z| method.prototypes.scores(&loss::l2_normalize(z)?))
            .collect::<Result<_>>()?;
        let codes: Vec<Tensor> = scores.iter().map(|s| loss::sinkhorn_knopp(s, 0.05, 3)).collect::<Result<_>>()?;
        let expected = loss::swapped_prediction(&scores, &codes[..2], 0.1)?.to_scalar::<f32>()?;
        let every_view_coded = loss::swapped_prediction(&scores, &codes, 0.1)?.to_scalar::<f32>()?;
        assert!((expected - every_view_coded).abs() > 1e-4);

        let loss = method.loss(&views, &labels, &[0; 6], 1)?;
        assert!((loss.to_scalar::<f32>()? - expected).abs() < 1e-5);
        let grads = loss.backward()?;
        let trainable = trainable_vars(&varmap);
        assert!(trainable.iter().any(|(name, _)| name.starts_with("prototypes")));
        for (name, var) in trainable {
            assert!(grads.get(var.as_tensor()).is_some(), "no gradient for {name}");
        }
        Ok(())
    }
}
