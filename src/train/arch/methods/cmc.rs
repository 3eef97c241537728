//! CMC (Tian et al. 2020, "Contrastive Multiview Coding"): synchronous, one encoder per source.
//!
//! - sources: the image and its Sobel edge map ([`sobel_edges`]); each has its own encoder and
//!   projector (`encoder.*`/`projector.*` read the image and are what is served,
//!   `edges.encoder.*`/`edges.projector.*` read the edges);
//! - views: the paper takes both sources from the same augmented view, so what the encoders
//!   must agree on is only the content the sources share; by default (`two_crops`) the edges
//!   come from the sample's second view, which adds SimCLR's invariance to the crop (on the
//!   test subset the paper's way stays below a random encoder's k-NN after 210 steps);
//! - pairs: the two sources of a sample are positives; the negatives of an image vector are the
//!   other samples' edge vectors and vice versa, never its own source's
//!   ([`Denominator::OtherViews`]): the paper's `L(V₁, V₂) + L(V₂, V₁)`;
//! - loss: `ℓ = −log( e^{z¹_i·z²_i/τ} / Σ_j e^{z¹_i·z²_j/τ} )` in both directions, or the run's
//!   instance loss. The paper draws its negatives from a memory bank; in-batch negatives are
//!   its later InfoNCE form (and what its reference code offers as the alternative).

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::Encoder;
use crate::train::pairs::{sobel_edges, Contrast, Denominator};

pub struct Cmc {
    config: MethodConfig,
    image: Branch,
    edges: Branch,
}

impl Cmc {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        if !matches!(config, MethodConfig::Cmc { .. }) {
            candle_core::bail!("not a CMC config")
        }
        let projector = parts.projector_config();
        let image = parts.branch(&projector)?;
        let edge_encoder = parts.encoder.with_in_channels(1);
        let edges = Branch::new(parts.vb.pp("edges"), &edge_encoder, &projector, parts.backend)?;
        Ok(Self { config, image, edges })
    }
}

impl Method for Cmc {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _indices: &[usize], _step: usize) -> Result<Tensor> {
        let MethodConfig::Cmc { temperature, two_crops, loss } = &self.config else {
            unreachable!("built from a CMC config")
        };
        let image_view = &views[0];
        let edge_view = sobel_edges(if *two_crops { &views[1] } else { &views[0] })?;
        let z_image = self.image.projector.forward_t(&self.image.encoder.forward_t(image_view, true)?, true)?;
        let z_edges = self.edges.projector.forward_t(&self.edges.encoder.forward_t(&edge_view, true)?, true)?;
        let contrast = Contrast::in_batch_views(&[z_image, z_edges], Denominator::OtherViews)?;
        loss.loss(&contrast, *temperature)
    }

    fn encoder(&self) -> &Encoder {
        &self.image.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.image.encoder
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use crate::train::arch::methods::trainable_vars;
    use crate::train::arch::ResNetConfig;

    /// Both encoders train (the edge encoder reads one channel whatever the image has), and the
    /// served encoder is the image's.
    #[test]
    fn both_sources_train_and_the_image_encoder_is_served() -> Result<()> {
        let varmap = VarMap::new();
        let encoder = ResNetConfig { widths: vec![4, 8, 8], ..ResNetConfig::canonical(3) }.into();
        let parts = MethodParts::for_test(&varmap, &encoder);
        let mut method = Cmc::new(MethodConfig::default_for("cmc").unwrap(), &parts)?;
        let vars = trainable_vars(&varmap);
        let shape = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.dims().to_vec());
        assert_eq!(shape("encoder.stem.conv.weight"), Some(vec![4, 3, 3, 3]));
        assert_eq!(shape("edges.encoder.stem.conv.weight"), Some(vec![4, 1, 3, 3]));
        let views = vec![Tensor::randn(0f32, 1., (4, 3, 12, 12), &Device::Cpu)?; 2];
        let loss = method.loss(&views, &Tensor::zeros(4, DType::U32, &Device::Cpu)?, &[0, 1, 2, 3], 0)?;
        let grads = loss.backward()?;
        for name in
            ["encoder.stem.conv.weight", "edges.encoder.stem.conv.weight", "edges.projector.layer1.linear.weight"]
        {
            let var = &vars.iter().find(|(n, _)| n == name).expect(name).1;
            assert!(grads.get(var.as_tensor()).is_some(), "no gradient reached {name}");
        }
        assert_eq!(method.encoder().config().in_channels(), 3);
        Ok(())
    }
}
