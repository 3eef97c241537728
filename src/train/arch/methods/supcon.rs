//! Supervised contrastive learning (Khosla et al. 2020): synchronous symmetric, like SimCLR, but
//! every view of every sample with the same label is a positive (positive expansion by labels).
//! The loss is SupCon's L_out. Fine-tuning jobs use this method.

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::ResNet;
use crate::train::loss;

pub struct SupCon {
    config: MethodConfig,
    temperature: f64,
    branch: Branch,
}

impl SupCon {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Supcon { temperature } = config else { candle_core::bail!("not a SupCon config") };
        let branch = parts.branch(&parts.projector_config())?;
        Ok(Self { config, temperature, branch })
    }
}

impl Method for SupCon {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], labels: &Tensor, _step: usize) -> Result<Tensor> {
        let z = Tensor::cat(&self.branch.project_views(views, true)?, 0)?;
        // Views are stacked view-major, so the labels repeat once per view.
        let labels = Tensor::cat(&vec![labels.clone(); views.len()], 0)?;
        loss::supcon(&z, &labels, self.temperature)
    }

    fn encoder(&self) -> &ResNet {
        &self.branch.encoder
    }
}
