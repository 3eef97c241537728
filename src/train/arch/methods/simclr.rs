//! SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
//! Representations"): synchronous symmetric.
//!
//! - encoder f and projector g shared by both views;
//! - pairs: the two views of a sample are positives, every other view in the batch a negative;
//! - loss: NT-Xent over the 2N projections.

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::ResNet;
use crate::train::loss;

pub struct SimClr {
    config: MethodConfig,
    temperature: f64,
    branch: Branch,
}

impl SimClr {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Simclr { temperature } = config else { candle_core::bail!("not a SimCLR config") };
        let branch = parts.branch(&parts.projector_config())?;
        Ok(Self { config, temperature, branch })
    }
}

impl Method for SimClr {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _indices: &[usize], _step: usize) -> Result<Tensor> {
        let z = self.branch.project_views(views, true)?;
        loss::nt_xent(&z[0], &z[1], self.temperature)
    }

    fn encoder(&self) -> &ResNet {
        &self.branch.encoder
    }

    fn encoder_mut(&mut self) -> &mut ResNet {
        &mut self.branch.encoder
    }
}
