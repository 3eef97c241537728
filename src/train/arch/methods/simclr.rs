//! SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
//! Representations"): synchronous symmetric.
//!
//! - encoder f and projector g shared by both views;
//! - pairs: the two views of a sample are positives, every other view in the batch a negative
//!   ([`Contrast::in_batch`]), then the run's pair strategies (MixCo adds mixed images of the
//!   first view as anchors, Mixup as hard negatives);
//! - loss: NT-Xent over the 2N projections, or the run's instance loss. DirectCLR has no
//!   projector: it contrasts the first d₀ dimensions of the encoder's features.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::{Method, MethodConfig, MethodParts};
use crate::train::arch::{Encoder, Mlp};
use crate::train::loss::ContrastLoss;
use crate::train::pairs::{add_hardest_mixed_negatives, fnc, Contrast, PairPipeline};

pub struct SimClr {
    config: MethodConfig,
    temperature: f64,
    loss: ContrastLoss,
    pairs: PairPipeline,
    encoder: Encoder,
    /// None for DirectCLR.
    projector: Option<Mlp>,
}

impl SimClr {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Simclr { temperature, loss, pairs } = &config else {
            candle_core::bail!("not a SimCLR config")
        };
        let encoder = Encoder::new(parts.vb.pp("encoder"), parts.encoder, parts.backend)?;
        let (projector, dim) = match loss.direct_dims() {
            Some(dims) if dims == 0 || dims > encoder.feature_dim() => candle_core::bail!(
                "directclr: dims must be in 1..={} (the encoder's feature size), got {dims}",
                encoder.feature_dim()
            ),
            Some(dims) => (None, dims),
            None => {
                let projector = parts.projector_config();
                (Some(Mlp::new(parts.vb.pp("projector"), &projector, parts.backend)?), projector.out_dim())
            }
        };
        let pairs = PairPipeline::new(pairs, dim, parts.seed, parts.vb.device())?;
        Ok(Self { temperature: *temperature, loss: loss.clone(), pairs, encoder, projector, config })
    }

    /// The contrasted vectors of every view, one forward pass over all of them.
    fn project_views(&self, views: &[Tensor]) -> Result<Vec<Tensor>> {
        let h = self.encoder.forward_t(&Tensor::cat(views, 0)?, true)?;
        let z = match (&self.projector, self.loss.direct_dims()) {
            (Some(projector), _) => projector.forward_t(&h, true)?,
            (None, Some(dims)) => h.narrow(1, 0, dims)?,
            (None, None) => unreachable!("only DirectCLR has no projector"),
        };
        z.chunk(views.len(), 0)
    }
}

impl Method for SimClr {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _indices: &[usize], step: usize) -> Result<Tensor> {
        let n = views[0].dim(0)?;
        let mixing = self.pairs.mixing(n, step)?;
        let mut inputs = views.to_vec();
        if let Some(mixing) = &mixing {
            inputs.push(mixing.mix_images(&views[0])?);
        }
        let z = self.project_views(&inputs)?;
        let mut contrast = Contrast::in_batch(&z[0], &z[1])?;
        if let Some(mixing) = &mixing {
            let mixed = &z[views.len()];
            match self.pairs.mixed_negatives() {
                Some(hardest) => {
                    let images: Vec<usize> = (0..2 * n).map(|a| a % n).collect();
                    add_hardest_mixed_negatives(&mut contrast, mixing, mixed, &images, hardest)?
                }
                // MixCo: mixed anchors are positives of the second views (columns N..2N).
                None => mixing.add_anchors(&mut contrast, mixed, &(n..2 * n).collect::<Vec<_>>(), &vec![1.0; 2 * n])?,
            }
        }
        if views.len() > 2 {
            // Both anchors of an image share its support views.
            contrast.support = Some(fnc::support_of_anchors(&z[2..views.len()], 2)?);
        }
        self.pairs.apply(&mut contrast, step)?;
        self.loss.loss(&contrast, self.temperature)
    }

    fn after_step(&mut self, _progress: f64) -> Result<()> {
        self.pairs.after_step()
    }

    fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.encoder
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        self.pairs.buffers()
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        self.pairs.load_buffers(buffers)
    }
}
