//! SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
//! Assignments"): clustering.
//!
//! - encoder + projector shared by both views, then K learnable prototypes on the unit sphere;
//! - codes: Sinkhorn-Knopp on each view's prototype scores (equal-partition constraint, no
//!   gradient);
//! - loss: swapped prediction — each view predicts the other's code from its own scores;
//! - prototypes are renormalised after each step and frozen for the first steps, as in the paper.

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::{Encoder, Prototypes};
use crate::train::loss;

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
        let codes: Vec<Tensor> =
            scores.iter().map(|s| loss::sinkhorn_knopp(s, epsilon, sinkhorn_iterations)).collect::<Result<_>>()?;
        loss::swapped_prediction(&scores[0], &scores[1], &codes[0], &codes[1], temperature)
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
