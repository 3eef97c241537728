//! SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning"): asynchronous
//! asymmetric without a momentum encoder.
//!
//! - one encoder + projector (ending in batch norm) shared by both views, a bottleneck predictor
//!   on one side;
//! - the other side is the same network behind a stop-gradient;
//! - loss: `−½ cos(p₁, sg(z₂)) − ½ cos(p₂, sg(z₁))`.

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::{Encoder, Mlp, MlpConfig};
use crate::train::loss;

pub struct SimSiam {
    config: MethodConfig,
    branch: Branch,
    predictor: Mlp,
}

impl SimSiam {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Simsiam { predictor_hidden, .. } = config else { candle_core::bail!("not a SimSiam config") };
        let projector = MlpConfig { output_batch_norm: true, ..parts.projector_config() };
        let branch = parts.branch(&projector)?;
        let out = projector.out_dim();
        let predictor =
            Mlp::new(parts.vb.pp("predictor"), &MlpConfig::new(&[out, predictor_hidden, out]), parts.backend)?;
        Ok(Self { config, branch, predictor })
    }
}

impl Method for SimSiam {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _indices: &[usize], _step: usize) -> Result<Tensor> {
        let z = self.branch.project_views(views, true)?;
        let p = self.predictor.forward_t(&Tensor::cat(&z, 0)?, true)?.chunk(2, 0)?;
        // The stop-gradient on z is inside the loss.
        (loss::simsiam(&p[0], &z[1])? + loss::simsiam(&p[1], &z[0])?)? / 2.0
    }

    fn encoder(&self) -> &Encoder {
        &self.branch.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.branch.encoder
    }
}
