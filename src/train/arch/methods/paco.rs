//! Parametric contrastive learning, PaCo (Cui et al. 2021): SupCon's synchronous symmetric branch
//! with a linear classifier on the encoder's features whose weights are learnable class centres.
//! Each anchor's softmax holds the centres' logits and the other views; its positives are its
//! class's centre (weight β) and the same-class views (weight α, small), so every class pulls
//! its members with the same strength whatever its share of a long-tailed batch.

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::Encoder;
use crate::train::loss;

pub struct Paco {
    config: MethodConfig,
    branch: Branch,
    /// `w_c·h + b_c`: the parametric class centres.
    centres: Linear,
}

impl Paco {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Paco { classes, .. } = config else { candle_core::bail!("not a PaCo config") };
        let branch = parts.branch(&parts.projector_config())?;
        let centres = candle_nn::linear(parts.encoder.feature_dim(), classes, parts.vb.pp("centres"))?;
        Ok(Self { config, branch, centres })
    }
}

impl Method for Paco {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], labels: &Tensor, _indices: &[usize], _step: usize) -> Result<Tensor> {
        let MethodConfig::Paco { temperature, alpha, beta, .. } = self.config else { unreachable!("a PaCo config") };
        let h = self.branch.encoder.forward_t(&Tensor::cat(views, 0)?, true)?;
        let z = self.branch.projector.forward_t(&h, true)?;
        let labels = Tensor::cat(&vec![labels.clone(); views.len()], 0)?;
        loss::paco(&z, &self.centres.forward(&h)?, &labels, temperature, alpha, beta)
    }

    fn encoder(&self) -> &Encoder {
        &self.branch.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.branch.encoder
    }
}
