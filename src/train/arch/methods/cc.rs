//! Contrastive Clustering, CC (Li, Hu, Liu, Peng, Zhou & Peng, AAAI 2021): clustering.
//!
//! - one encoder shared by both views, two heads on its features;
//! - instance head (the projector): NT-Xent over the 2N views, instance-level contrast (τ_I);
//! - cluster head: Linear → ReLU → Linear → softmax over M clusters; the columns of the two
//!   views' `[N, M]` assignments are contrasted at the cluster level, with the entropy of the
//!   cluster sizes ([`loss::cluster_contrast`], τ_C);
//! - loss: the sum of the two. The cluster head's argmax is the model's own clustering, which
//!   the evaluation scores beside k-means of the features.

use candle_core::{Result, Tensor, D};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::{Encoder, Mlp, MlpConfig};
use crate::train::loss;

pub struct ContrastiveClustering {
    config: MethodConfig,
    branch: Branch,
    cluster_head: Mlp,
}

impl ContrastiveClustering {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Cc { clusters, .. } = config else {
            candle_core::bail!("not a Contrastive Clustering config")
        };
        let branch = parts.branch(&parts.projector_config())?;
        let features = parts.encoder.feature_dim();
        let head = MlpConfig { hidden_batch_norm: false, ..MlpConfig::new(&[features, features, clusters]) };
        let cluster_head = Mlp::new(parts.vb.pp("cluster_head"), &head, parts.backend)?;
        Ok(Self { config, branch, cluster_head })
    }

    fn assignments(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        candle_nn::ops::softmax(&self.cluster_head.forward_t(features, train)?, D::Minus1)
    }
}

impl Method for ContrastiveClustering {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _indices: &[usize], _step: usize) -> Result<Tensor> {
        let MethodConfig::Cc { instance_temperature, cluster_temperature, .. } = self.config else {
            unreachable!("a CC config")
        };
        let h = self.branch.encoder.forward_t(&Tensor::cat(views, 0)?, true)?;
        let z = self.branch.projector.forward_t(&h, true)?.chunk(2, 0)?;
        let y = self.assignments(&h, true)?.chunk(2, 0)?;
        let instance = loss::nt_xent(&z[0], &z[1], instance_temperature)?;
        instance + loss::cluster_contrast(&y[0], &y[1], cluster_temperature)?
    }

    fn cluster_assignments(&self, features: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.assignments(features, false)?.argmax(D::Minus1)?))
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
    use crate::train::arch::ResNetConfig;
    use candle_core::{Device, Tensor};

    use crate::data::{Dataset, ImageShape};
    use crate::train::arch::MethodConfig;
    use crate::train::config::TrainConfig;
    use crate::train::{EvalScope, Model};

    fn model(method: &str) -> Model {
        let shape = ImageShape::new(1, 28, 28);
        let mut config = TrainConfig::for_method(MethodConfig::default_for(method).unwrap(), shape);
        config.encoder = ResNetConfig { widths: vec![8, 16, 16], ..ResNetConfig::canonical(1) }.into();
        config.method.set_classes(3);
        Model::new(&config, &Device::Cpu).unwrap()
    }

    #[test]
    fn the_cluster_head_assigns_softly_and_is_scored_beside_k_means() {
        let cc = model("cc");
        let views: Vec<Tensor> =
            (0..2).map(|_| Tensor::rand(0f32, 1f32, (6, 1, 28, 28), &Device::Cpu).unwrap()).collect();
        let mut trainable = model("cc");
        let loss =
            trainable.method.loss(&views, &Tensor::zeros(6, candle_core::DType::U32, &Device::Cpu).unwrap(), &[], 0);
        assert!(loss.unwrap().to_scalar::<f32>().unwrap().is_finite());

        let images: Vec<f32> = (0..12 * 784).map(|i| ((i * 7919) % 255) as f32 / 255.0).collect();
        let labels: Vec<u32> = (0..12).map(|i| i % 3).collect();
        let names = vec!["a".into(), "b".into(), "c".into()];
        let data = Dataset::new(images, labels, ImageShape::new(1, 28, 28), names).unwrap();
        let scope = EvalScope { clustering: true, ..EvalScope::KNN };
        let report = cc.evaluate(&data, &data, scope).unwrap();
        let head = report.cluster_head.expect("CC scores its own cluster head");
        assert!((1..=3).contains(&head.clusters) && (0.0..=1.0).contains(&head.nmi), "{head:?}");
        assert!(model("simclr").evaluate(&data, &data, scope).unwrap().cluster_head.is_none(), "no head, no figures");
    }
}
