//! BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"): asynchronous asymmetric.
//!
//! - online branch: encoder + projector + predictor, trained by gradient;
//! - target branch: encoder + projector, an EMA of the online one with momentum rising from
//!   `base_momentum` to 1 on a cosine schedule;
//! - pairs: positives only (the two views of a sample), no negatives;
//! - loss: `2 − 2 cos(q, sg(z'))`, symmetrised over the views.

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::{ema::cosine_momentum, EmaPairs, Encoder, Mlp, MlpConfig};
use crate::train::loss;

pub struct Byol {
    config: MethodConfig,
    base_momentum: f64,
    online: Branch,
    predictor: Mlp,
    target: Branch,
    ema: EmaPairs,
}

impl Byol {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Byol { base_momentum, predictor_hidden, .. } = config else {
            candle_core::bail!("not a BYOL config")
        };
        let projector = parts.projector_config();
        let online = parts.branch(&projector)?;
        let out = projector.out_dim();
        let predictor =
            Mlp::new(parts.vb.pp("predictor"), &MlpConfig::new(&[out, predictor_hidden, out]), parts.backend)?;
        let (target, ema) = parts.target_branch(&projector)?;
        Ok(Self { config, base_momentum, online, predictor, target, ema })
    }
}

impl Method for Byol {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _indices: &[usize], _step: usize) -> Result<Tensor> {
        let z = self.online.project_views(views, true)?;
        let p = self.predictor.forward_t(&Tensor::cat(&z, 0)?, true)?.chunk(2, 0)?;
        let t = self.target.project_views(views, true)?;
        (loss::byol(&p[0], &t[1])? + loss::byol(&p[1], &t[0])?)? / 2.0
    }

    fn after_step(&mut self, progress: f64) -> Result<()> {
        self.ema.update(cosine_momentum(self.base_momentum, progress))
    }

    fn encoder(&self) -> &Encoder {
        &self.online.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.online.encoder
    }
}
