//! Prototypical Contrastive Learning, PCL (Li, Zhou, Xiong & Hoi, ICLR 2021): clustering, as an
//! EM algorithm on top of MoCo v2.
//!
//! - branches, pairs and InfoNCE are MoCo v2's ([`MocoV2`]): query encoder, momentum key
//!   encoder, memory queue;
//! - E-step, before each epoch after the warm-up: the key branch's projections of every training
//!   image (evaluation mode, no augmentation), L2-normalised, clustered by k-means at each of
//!   several K; each cluster's prototype is its normalised centroid and its concentration `φ` is
//!   estimated from its members' distances ([`loss::proto_nce`]);
//! - M-step, each batch: ProtoNCE, InfoNCE plus the mean over the clusterings of the prototype
//!   term, each view's queries pulled to their image's prototypes. The paper samples r negative
//!   prototypes; with K in the tens to hundreds every prototype is a negative here;
//! - warm-up epochs train with InfoNCE alone, since early clusters are noise.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use super::moco::MocoV2;
use super::{Method, MethodConfig, MethodParts};
use crate::data::Dataset;
use crate::eval::kmeans::{kmeans, KMeansConfig};
use crate::train::arch::Encoder;
use crate::train::loader::mix_seed;
use crate::train::loss::{self, proto_nce};

/// Images encoded at once in the E-step.
const ENCODE_BATCH: usize = 512;

/// One clustering of the training set.
pub(super) struct Clustering {
    /// `[K, D]` unit prototypes.
    pub prototypes: Tensor,
    /// `[K]` concentrations.
    pub concentration: Tensor,
    /// The cluster of each training image.
    pub assignments: Vec<u32>,
}

impl Clustering {
    /// The clustering of `points` (unit rows) by `assignments` to `centroids` (`[K · D]`): the
    /// normalised centroids and each cluster's concentration from its members' distances.
    pub fn new(
        points: &[Vec<f32>],
        assignments: Vec<u32>,
        centroids: Vec<f32>,
        temperature: f64,
        device: &Device,
    ) -> Result<Self> {
        let dim = points.first().map_or(0, Vec::len);
        let k = centroids.len() / dim.max(1);
        let mut distances = vec![Vec::new(); k];
        for (row, &c) in points.iter().zip(&assignments) {
            let centroid = &centroids[c as usize * dim..(c as usize + 1) * dim];
            let d: f64 = row.iter().zip(centroid).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            distances[c as usize].push(d.sqrt());
        }
        let phi: Vec<f32> = proto_nce::concentrations(&distances, temperature).iter().map(|&p| p as f32).collect();
        Ok(Self {
            prototypes: loss::l2_normalize(&Tensor::from_vec(centroids, (k, dim), device)?)?,
            concentration: Tensor::new(phi, device)?,
            assignments,
        })
    }

    /// The clusters of the images at `indices`, `[N]`.
    pub fn assigned(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let assigned: Vec<u32> =
            indices.iter().map(|&i| self.assignments.get(i).copied()).collect::<Option<_>>().ok_or_else(|| {
                candle_core::Error::Msg("clusters need each image's index in the clustered training set".into())
            })?;
        Tensor::new(assigned, device)
    }
}

/// The key branch's projections of every training image, unit rows (evaluation mode): the
/// `[N, D]` tensor k-means reads, and its rows for the per-member distances.
pub(super) fn key_projections(moco: &MocoV2, train: &Dataset, device: &Device) -> Result<(Tensor, Vec<Vec<f32>>)> {
    let key = moco.key_branch();
    let projections = crate::eval::encode(train, device, ENCODE_BATCH, |x| {
        key.projector.forward_t(&key.encoder.forward_t(x, false)?, false)
    })?;
    let v = loss::l2_normalize(&projections.to_dtype(DType::F32)?)?;
    let rows = v.to_vec2::<f32>()?;
    Ok((v, rows))
}

/// The checkpoint buffers of `clusterings` made at `epoch`, named `{prefix}.{m}.…`.
pub(super) fn clustering_buffers(
    prefix: &str,
    epoch: usize,
    clusterings: &[Clustering],
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let mut buffers = vec![(format!("{prefix}.epoch"), Tensor::new(&[epoch as u32], device)?)];
    for (m, c) in clusterings.iter().enumerate() {
        buffers.push((format!("{prefix}.{m}.prototypes"), c.prototypes.clone()));
        buffers.push((format!("{prefix}.{m}.concentration"), c.concentration.clone()));
        buffers.push((format!("{prefix}.{m}.assignments"), Tensor::new(c.assignments.as_slice(), device)?));
    }
    Ok(buffers)
}

/// The clusterings and their epoch saved by [`clustering_buffers`], if any.
pub(super) fn load_clusterings(
    prefix: &str,
    buffers: &HashMap<String, Tensor>,
) -> Result<Option<(usize, Vec<Clustering>)>> {
    let Some(epoch) = buffers.get(&format!("{prefix}.epoch")) else { return Ok(None) };
    let mut clusterings = Vec::new();
    while let (Some(p), Some(f), Some(a)) = (
        buffers.get(&format!("{prefix}.{}.prototypes", clusterings.len())),
        buffers.get(&format!("{prefix}.{}.concentration", clusterings.len())),
        buffers.get(&format!("{prefix}.{}.assignments", clusterings.len())),
    ) {
        clusterings.push(Clustering {
            prototypes: p.clone(),
            concentration: f.clone(),
            assignments: a.to_vec1::<u32>()?,
        });
    }
    Ok(Some((epoch.to_vec1::<u32>()?[0] as usize, clusterings)))
}

pub struct Pcl {
    config: MethodConfig,
    moco: MocoV2,
    clusterings: Vec<Clustering>,
    clustered_epoch: Option<usize>,
    seed: u64,
    device: Device,
}

impl Pcl {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Pcl { temperature, queue_size, momentum, ref clusters, ref loss, ref pairs, .. } = config
        else {
            candle_core::bail!("not a PCL config")
        };
        if clusters.is_empty() || clusters.iter().any(|&k| k < 2) {
            candle_core::bail!("PCL needs one or more clusterings of at least 2 clusters, got {clusters:?}")
        }
        let moco = MocoV2::with(config.clone(), temperature, queue_size, momentum, loss.clone(), pairs, parts)?;
        Ok(Self {
            config,
            moco,
            clusterings: Vec::new(),
            clustered_epoch: None,
            seed: parts.seed,
            device: parts.vb.device().clone(),
        })
    }

    /// The E-step: k-means of the key branch's projections at each K.
    fn cluster(&self, train: &Dataset, epoch: usize) -> Result<Vec<Clustering>> {
        let MethodConfig::Pcl { temperature, ref clusters, .. } = self.config else { unreachable!("a PCL config") };
        let (v, rows) = key_projections(&self.moco, train, &self.device)?;
        clusters
            .iter()
            .enumerate()
            .map(|(level, &k)| {
                let config = KMeansConfig::new(k, mix_seed(&[self.seed, epoch as u64, level as u64]));
                let result =
                    kmeans(&v, &config).map_err(|e| candle_core::Error::Msg(format!("PCL's k-means: {e:#}")))?;
                Clustering::new(&rows, result.assignments, result.centroids, temperature, &self.device)
            })
            .collect()
    }
}

impl Method for Pcl {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn before_epoch(&mut self, train: &Dataset, epoch: usize) -> Result<()> {
        let MethodConfig::Pcl { warmup_epochs, .. } = self.config else { unreachable!("a PCL config") };
        let resumed = self.clustered_epoch == Some(epoch)
            && self.clusterings.first().is_some_and(|c| c.assignments.len() == train.len());
        if epoch >= warmup_epochs && !resumed {
            self.clusterings = self.cluster(train, epoch)?;
            self.clustered_epoch = Some(epoch);
        }
        Ok(())
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, indices: &[usize], step: usize) -> Result<Tensor> {
        let (queries, info_nce) = self.moco.queries_and_loss(views, step)?;
        if self.clusterings.is_empty() {
            return Ok(info_nce); // warm-up
        }
        let mut prototype_terms = Vec::new();
        for clustering in &self.clusterings {
            let assigned = clustering.assigned(indices, &self.device)?;
            for q in &queries {
                prototype_terms.push(proto_nce::prototype_term(
                    q,
                    &clustering.prototypes,
                    &clustering.concentration,
                    &assigned,
                )?);
            }
        }
        let count = prototype_terms.len() as f64;
        info_nce + (Tensor::stack(&prototype_terms, 0)?.sum_all()? / count)?
    }

    fn after_step(&mut self, progress: f64) -> Result<()> {
        self.moco.after_step(progress)
    }

    fn encoder(&self) -> &Encoder {
        self.moco.encoder()
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        self.moco.encoder_mut()
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut buffers = self.moco.buffers()?;
        if let Some(epoch) = self.clustered_epoch {
            buffers.extend(clustering_buffers("pcl", epoch, &self.clusterings, &self.device)?);
        }
        Ok(buffers)
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        self.moco.load_buffers(buffers)?;
        if let Some((epoch, clusterings)) = load_clusterings("pcl", buffers)? {
            self.clusterings = clusterings;
            self.clustered_epoch = Some(epoch);
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
    use crate::train::loss::ContrastLoss;
    use crate::train::pairs::PairStrategy;
    use crate::train::Model;

    /// PCL's instance part is its MoCo's, so it takes MoCo's losses and pair strategies (and
    /// refuses what MoCo refuses).
    #[test]
    fn takes_the_losses_and_pair_strategies_of_its_moco() {
        let with = |name: &str, strategies: &[&str]| {
            let mut config = MethodConfig::default_for("pcl").unwrap();
            if let MethodConfig::Pcl { loss, pairs, .. } = &mut config {
                *loss = ContrastLoss::default_for(name).unwrap();
                *pairs = strategies.iter().map(|s| PairStrategy::default_for(s).unwrap()).collect();
            }
            config
        };
        let dcl = with("dcl", &["mochi"]);
        dcl.validate().unwrap();
        assert_eq!(dcl.loss_name(), "dcl");
        assert_eq!(dcl.pair_strategies().len(), 1);
        let err = with("directclr", &[]).validate().unwrap_err().to_string();
        assert!(err.contains("--method pcl keeps its projector"), "{err}");
        let err = with("dcl", &["debiased"]).validate().unwrap_err().to_string();
        assert!(err.contains("debiased"), "{err}");
    }

    fn model() -> Model {
        let method = MethodConfig::Pcl {
            temperature: 0.2,
            queue_size: 32,
            momentum: 0.99,
            clusters: vec![2, 4],
            warmup_epochs: 1,
            loss: ContrastLoss::InfoNce,
            pairs: Vec::new(),
        };
        let mut config = TrainConfig::for_method(method, ImageShape::new(1, 28, 28));
        config.encoder = ResNetConfig { widths: vec![8, 16, 16], ..ResNetConfig::canonical(1) }.into();
        Model::new(&config, &Device::Cpu).unwrap()
    }

    #[test]
    fn warms_up_with_info_nce_then_adds_prototypes_and_checkpoints_them() {
        let images: Vec<f32> = (0..12 * 784).map(|i| ((i * 7919 + i / 784 * 131) % 255) as f32 / 255.0).collect();
        let data = Dataset::new(images, vec![0; 12], ImageShape::new(1, 28, 28), vec!["x".into()]).unwrap();
        let views: Vec<Tensor> =
            (0..2).map(|_| Tensor::rand(0f32, 1f32, (4, 1, 28, 28), &Device::Cpu).unwrap()).collect();
        let labels = Tensor::zeros(4, candle_core::DType::U32, &Device::Cpu).unwrap();
        let indices = [0, 3, 7, 11];
        let (mut a, mut b) = (model(), model());
        a.method.before_epoch(&data, 0).unwrap();
        assert!(a.method.buffers().unwrap().iter().all(|(n, _)| !n.starts_with("pcl.")), "no clusters in the warm-up");
        let warm = a.method.loss(&views, &labels, &indices, 0).unwrap().to_scalar::<f32>().unwrap();
        let moco = b.method.loss(&views, &labels, &indices, 0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(warm, moco, "the warm-up is InfoNCE alone");

        a.method.before_epoch(&data, 1).unwrap();
        let buffers: std::collections::HashMap<_, _> = a.method.buffers().unwrap().into_iter().collect();
        assert_eq!(buffers["pcl.1.prototypes"].dims(), &[4, 64]);
        let phi = buffers["pcl.0.concentration"].to_vec1::<f32>().unwrap();
        assert!((phi.iter().sum::<f32>() / 2.0 - 0.2).abs() < 1e-5, "mean concentration is τ: {phi:?}");
        let with_prototypes = a.method.loss(&views, &labels, &indices, 1).unwrap().to_scalar::<f32>().unwrap();
        b.method.load_buffers(&buffers).unwrap();
        b.method.before_epoch(&data, 1).unwrap(); // resumed within epoch 1: keeps the clusters
        let resumed = b.method.loss(&views, &labels, &indices, 1).unwrap().to_scalar::<f32>().unwrap();
        assert!(with_prototypes.is_finite() && with_prototypes > 0.0);
        let _ = resumed; // b's weights differ (it took no step), its clusters must not
        let again: std::collections::HashMap<_, _> = b.method.buffers().unwrap().into_iter().collect();
        assert_eq!(
            again["pcl.0.assignments"].to_vec1::<u32>().unwrap(),
            buffers["pcl.0.assignments"].to_vec1::<u32>().unwrap()
        );
    }
}
