//! DeepCluster (Caron, Bojanowski, Joulin & Douze, "Deep Clustering for Unsupervised Learning of
//! Visual Features", ECCV 2018): clustering, with pseudo-labels instead of pairs.
//!
//! - before each epoch: the encoder's features of every training image (evaluation mode, no
//!   augmentation), L2-normalised, are clustered by k-means into K clusters (k-means++, restarts,
//!   seeded; an empty cluster is re-seeded with the point farthest from its centroid); the
//!   assignments are the epoch's pseudo-labels;
//! - the classifier on the projection head is re-initialised, since its classes mean something
//!   new each epoch;
//! - the loss: cross-entropy of each augmented view against its image's pseudo-label. The paper
//!   samples images uniformly over clusters so that a large cluster cannot dominate; weighting
//!   each image by the inverse size of its cluster has the same expectation without a sampler.
//!
//! The paper reduces the features by PCA with whitening before k-means; that is left out (the
//! encoder's features here are 128-dimensional already).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::{Rng, SeedableRng};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::data::Dataset;
use crate::eval::kmeans::{kmeans, KMeansConfig};
use crate::train::arch::Encoder;
use crate::train::loader::mix_seed;
use crate::train::loss::{self, common::weighted_cross_entropy};

/// Images encoded at once when clustering the training set.
const ENCODE_BATCH: usize = 512;

pub struct DeepCluster {
    config: MethodConfig,
    branch: Branch,
    classifier_weight: Var,
    classifier_bias: Var,
    /// The pseudo-label of each training image, from the k-means of `labelled_epoch`.
    pseudo_labels: Vec<u32>,
    /// Per cluster: N / (non-empty clusters · cluster size), 0 for an empty cluster.
    cluster_weights: Vec<f32>,
    labelled_epoch: Option<usize>,
    seed: u64,
    device: Device,
}

impl DeepCluster {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Deepcluster { clusters, recluster_every_epochs } = config else {
            candle_core::bail!("not a DeepCluster config")
        };
        if clusters < 2 || recluster_every_epochs == 0 {
            candle_core::bail!(
                "DeepCluster needs at least 2 clusters and a period of at least 1 epoch, got {clusters} and {recluster_every_epochs}"
            )
        }
        let projector = parts.projector_config();
        let branch = parts.branch(&projector)?;
        let vb = parts.vb.pp("classifier");
        let weight = vb.get_with_hints((clusters, projector.out_dim()), "weight", candle_nn::init::ZERO)?;
        let bias = vb.get_with_hints(clusters, "bias", candle_nn::init::ZERO)?;
        Ok(Self {
            config,
            branch,
            classifier_weight: Var::from_tensor(&weight)?,
            classifier_bias: Var::from_tensor(&bias)?,
            pseudo_labels: Vec::new(),
            cluster_weights: Vec::new(),
            labelled_epoch: None,
            seed: parts.seed,
            device: parts.vb.device().clone(),
        })
    }

    fn clusters(&self) -> usize {
        self.classifier_bias.dim(0).expect("a bias vector")
    }

    fn class_logits(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        let z = self.branch.projector.forward_t(h, train)?;
        z.matmul(&self.classifier_weight.as_tensor().t()?)?.broadcast_add(self.classifier_bias.as_tensor())
    }

    /// A fresh classifier, `U(−1/√d, 1/√d)` weights and zero biases, drawn from the seed and epoch.
    fn reinitialise_classifier(&self, epoch: usize) -> Result<()> {
        let (clusters, dim) = self.classifier_weight.dims2()?;
        let bound = 1.0 / (dim as f32).sqrt();
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix_seed(&[self.seed, epoch as u64, 0xdc]));
        let weights: Vec<f32> = (0..clusters * dim).map(|_| rng.random_range(-bound..bound)).collect();
        self.classifier_weight.set(&Tensor::from_vec(weights, (clusters, dim), &self.device)?)?;
        self.classifier_bias.set(&Tensor::zeros(clusters, DType::F32, &self.device)?)
    }
}

impl Method for DeepCluster {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn before_epoch(&mut self, train: &Dataset, epoch: usize) -> Result<()> {
        let MethodConfig::Deepcluster { recluster_every_epochs, .. } = self.config else {
            unreachable!("a DeepCluster config")
        };
        // Between reclusterings, and when a run resumes within an epoch, the pseudo-labels stay.
        let due = epoch - epoch % recluster_every_epochs;
        if self.labelled_epoch == Some(due) && self.pseudo_labels.len() == train.len() {
            return Ok(());
        }
        let epoch = due;
        let encoder = &self.branch.encoder;
        let features = crate::eval::encode(train, &self.device, ENCODE_BATCH, |x| encoder.forward_t(x, false))?;
        let features = loss::l2_normalize(&features.to_dtype(DType::F32)?)?;
        let clusters = self.clusters();
        let result = kmeans(&features, &KMeansConfig::new(clusters, mix_seed(&[self.seed, epoch as u64])))
            .map_err(|e| candle_core::Error::Msg(format!("DeepCluster's k-means: {e:#}")))?;
        let mut sizes = vec![0usize; clusters];
        result.assignments.iter().for_each(|&c| sizes[c as usize] += 1);
        let used = sizes.iter().filter(|&&n| n > 0).count();
        self.cluster_weights =
            sizes.iter().map(|&n| if n == 0 { 0.0 } else { train.len() as f32 / (used * n) as f32 }).collect();
        self.pseudo_labels = result.assignments;
        self.labelled_epoch = Some(epoch);
        self.reinitialise_classifier(epoch)
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, indices: &[usize], _step: usize) -> Result<Tensor> {
        let n = views[0].dim(0)?;
        if indices.len() != n || indices.iter().any(|&i| i >= self.pseudo_labels.len()) {
            candle_core::bail!(
                "DeepCluster needs each image's training-set index and the epoch's pseudo-labels \
                 (got {} indices for {n} images, {} pseudo-labels)",
                indices.len(),
                self.pseudo_labels.len()
            )
        }
        let targets: Vec<u32> = indices.iter().map(|&i| self.pseudo_labels[i]).collect();
        let weights: Vec<f32> = targets.iter().map(|&c| self.cluster_weights[c as usize]).collect();
        let repeat = |v: Tensor| Tensor::cat(&vec![v; views.len()], 0);
        let targets = repeat(Tensor::new(targets, &self.device)?)?;
        let weights = repeat(Tensor::new(weights, &self.device)?)?;
        let h = self.branch.encoder.forward_t(&Tensor::cat(views, 0)?, true)?;
        weighted_cross_entropy(&self.class_logits(&h, true)?, &targets, &weights)
    }

    fn cluster_assignments(&self, features: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.class_logits(features, false)?.argmax(D::Minus1)?))
    }

    fn encoder(&self) -> &Encoder {
        &self.branch.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.branch.encoder
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let Some(epoch) = self.labelled_epoch else { return Ok(Vec::new()) };
        Ok(vec![
            ("deepcluster.pseudo_labels".into(), Tensor::new(self.pseudo_labels.as_slice(), &self.device)?),
            ("deepcluster.cluster_weights".into(), Tensor::new(self.cluster_weights.as_slice(), &self.device)?),
            ("deepcluster.epoch".into(), Tensor::new(&[epoch as u32], &self.device)?),
        ])
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        if let (Some(labels), Some(weights), Some(epoch)) = (
            buffers.get("deepcluster.pseudo_labels"),
            buffers.get("deepcluster.cluster_weights"),
            buffers.get("deepcluster.epoch"),
        ) {
            self.pseudo_labels = labels.to_vec1::<u32>()?;
            self.cluster_weights = weights.to_vec1::<f32>()?;
            self.labelled_epoch = Some(epoch.to_vec1::<u32>()?[0] as usize);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::train::arch::ResNetConfig;
    use candle_core::{Device, Tensor};

    use crate::data::{Dataset, ImageShape};
    use crate::train::arch::MethodConfig;
    use crate::train::config::TrainConfig;
    use crate::train::Model;

    fn model() -> Model {
        let mut config = TrainConfig::for_method(
            MethodConfig::Deepcluster { clusters: 4, recluster_every_epochs: 2 },
            ImageShape::new(1, 28, 28),
        );
        config.encoder = ResNetConfig { widths: vec![8, 16, 16], ..ResNetConfig::canonical(1) }.into();
        Model::new(&config, &Device::Cpu).unwrap()
    }

    fn data() -> Dataset {
        let images: Vec<f32> = (0..16 * 784).map(|i| ((i * 7919 + i / 784 * 31) % 255) as f32 / 255.0).collect();
        Dataset::new(images, vec![0; 16], ImageShape::new(1, 28, 28), vec!["x".into()]).unwrap()
    }

    #[test]
    fn pseudo_labels_come_before_the_loss_and_survive_a_checkpoint() {
        let mut m = model();
        let views: Vec<Tensor> =
            (0..2).map(|_| Tensor::rand(0f32, 1f32, (4, 1, 28, 28), &Device::Cpu).unwrap()).collect();
        let labels = Tensor::zeros(4, candle_core::DType::U32, &Device::Cpu).unwrap();
        let err = m.method.loss(&views, &labels, &[0, 1, 2, 3], 0).unwrap_err().to_string();
        assert!(err.contains("pseudo-labels"), "{err}");

        m.method.before_epoch(&data(), 0).unwrap();
        let buffers: std::collections::HashMap<_, _> = m.method.buffers().unwrap().into_iter().collect();
        let pseudo = buffers["deepcluster.pseudo_labels"].to_vec1::<u32>().unwrap();
        let weights = buffers["deepcluster.cluster_weights"].to_vec1::<f32>().unwrap();
        assert_eq!(pseudo.len(), 16);
        // Inverse cluster sizes: every non-empty cluster carries the same total weight, N / used.
        let used = weights.iter().filter(|&&w| w > 0.0).count();
        for c in 0..4u32 {
            let size = pseudo.iter().filter(|&&p| p == c).count();
            let total = size as f32 * weights[c as usize];
            assert!(size == 0 || (total - 16.0 / used as f32).abs() < 1e-4, "cluster {c}: {total}");
        }
        let loss = m.method.loss(&views, &labels, &[0, 5, 9, 15], 0).unwrap().to_scalar::<f32>().unwrap();
        assert!(loss.is_finite() && loss > 0.0);

        // A resumed run keeps the epoch's pseudo-labels rather than clustering again.
        let mut resumed = model();
        resumed.method.load_buffers(&buffers).unwrap();
        resumed.method.before_epoch(&data(), 0).unwrap();
        let again: std::collections::HashMap<_, _> = resumed.method.buffers().unwrap().into_iter().collect();
        assert_eq!(again["deepcluster.pseudo_labels"].to_vec1::<u32>().unwrap(), pseudo);
        // So does epoch 1, within the period of two; epoch 2 clusters again.
        resumed.method.before_epoch(&data(), 1).unwrap();
        let epoch_of =
            |m: &Model| m.method.buffers().unwrap().into_iter().find(|(n, _)| n == "deepcluster.epoch").unwrap().1;
        assert_eq!(epoch_of(&resumed).to_vec1::<u32>().unwrap(), vec![0]);
        resumed.method.before_epoch(&data(), 2).unwrap();
        assert_eq!(epoch_of(&resumed).to_vec1::<u32>().unwrap(), vec![2]);
    }
}
