//! Hierarchical Contrastive Selective Coding, HCSC (Guo, Xu, Wang, Ni, Zhou, Zha, Liu & Tang,
//! CVPR 2022): clustering, on top of MoCo v2 like PCL.
//!
//! - E-step, before each epoch after the warm-up: hierarchical prototypes. k-means of the key
//!   branch's projections into K_1 clusters, then k-means of those prototypes into K_2 < K_1,
//!   and so on; an image belongs to its cluster's parent at every level above;
//! - instance selection: a queue key is a negative of a query with probability
//!   `1 − p(key in the query's cluster)`, the key's softmax over the level's prototypes at their
//!   concentrations, drawn once per level: likely false negatives mostly leave the denominator;
//! - prototype selection: below the top level, a negative prototype stays with probability
//!   `1 − p(prototype in the parent of the query's cluster)` (the same softmax over the level
//!   above); at the top level every prototype is a negative;
//! - loss: the mean over levels of InfoNCE against the selected keys, plus the mean over levels
//!   of the prototype term against the selected prototypes ([`proto_nce`]), for both views.
//!
//! The draws come from the seed and the step, so runs repeat.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, D};
use rand::{Rng, SeedableRng};

use super::moco::MocoV2;
use super::pcl::{clustering_buffers, key_projections, load_clusterings, Clustering};
use super::{Method, MethodConfig, MethodParts};
use crate::data::Dataset;
use crate::eval::kmeans::{kmeans, KMeansConfig};
use crate::train::arch::Encoder;
use crate::train::loader::mix_seed;
use crate::train::loss::ContrastLoss;
use crate::train::loss::{self, proto_nce};

pub struct Hcsc {
    config: MethodConfig,
    moco: MocoV2,
    /// Finest level first.
    levels: Vec<Clustering>,
    /// For each level but the top, the parent (next level's cluster) of each of its clusters.
    parents: Vec<Vec<u32>>,
    clustered_epoch: Option<usize>,
    seed: u64,
    device: Device,
}

impl Hcsc {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Hcsc { temperature, queue_size, momentum, ref clusters, .. } = config else {
            candle_core::bail!("not an HCSC config")
        };
        if clusters.len() < 2 || clusters.windows(2).any(|w| w[1] >= w[0]) || clusters.last() < Some(&2) {
            candle_core::bail!(
                "HCSC needs two or more levels of decreasing cluster counts (at least 2), got {clusters:?}"
            )
        }
        let moco = MocoV2::with(config.clone(), temperature, queue_size, momentum, ContrastLoss::InfoNce, &[], parts)?;
        let device = parts.vb.device().clone();
        Ok(Self {
            config,
            moco,
            levels: Vec::new(),
            parents: Vec::new(),
            clustered_epoch: None,
            seed: parts.seed,
            device,
        })
    }

    /// Hierarchical k-means: images into K_1 clusters, then each level's prototypes into the next.
    fn cluster(&self, train: &Dataset, epoch: usize) -> Result<(Vec<Clustering>, Vec<Vec<u32>>)> {
        let MethodConfig::Hcsc { temperature, ref clusters, .. } = self.config else { unreachable!("an HCSC config") };
        let (v, rows) = key_projections(&self.moco, train, &self.device)?;
        let error = |e: anyhow::Error| candle_core::Error::Msg(format!("HCSC's k-means: {e:#}"));
        let seed = |level: usize| mix_seed(&[self.seed, epoch as u64, level as u64]);
        let first = kmeans(&v, &KMeansConfig::new(clusters[0], seed(0))).map_err(error)?;
        let mut levels = vec![Clustering::new(&rows, first.assignments, first.centroids, temperature, &self.device)?];
        let mut parents = Vec::new();
        for (level, &k) in clusters.iter().enumerate().skip(1) {
            let below = &levels[level - 1];
            let upper = kmeans(&below.prototypes, &KMeansConfig::new(k, seed(level))).map_err(error)?;
            let images: Vec<u32> = below.assignments.iter().map(|&c| upper.assignments[c as usize]).collect();
            parents.push(upper.assignments);
            levels.push(Clustering::new(&rows, images, upper.centroids, temperature, &self.device)?);
        }
        Ok((levels, parents))
    }

    /// `[rows.len(), K]` 0/1: column j kept for row i with probability `1 − p[j][target_i]`, where
    /// `p` is the row-softmax of `points · prototypes / φ` (clamped as the authors do).
    fn select(
        &self,
        points: &Tensor,
        level: &Clustering,
        targets: &[u32],
        stream: u64,
        clamp: (f32, f32),
    ) -> Result<Tensor> {
        let scores = points.matmul(&level.prototypes.t()?)?.broadcast_div(&level.concentration.unsqueeze(0)?)?;
        let membership = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(stream);
        let mask: Vec<f32> = targets
            .iter()
            .flat_map(|&t| membership.iter().map(move |p| (1.0 - p[t as usize]).clamp(clamp.0, clamp.1)))
            .map(|keep| if rng.random::<f32>() < keep { 1.0 } else { 0.0 })
            .collect();
        Tensor::from_vec(mask, (targets.len(), membership.len()), &self.device)
    }
}

impl Method for Hcsc {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn before_epoch(&mut self, train: &Dataset, epoch: usize) -> Result<()> {
        let MethodConfig::Hcsc { warmup_epochs, .. } = self.config else { unreachable!("an HCSC config") };
        let resumed = self.clustered_epoch == Some(epoch)
            && self.levels.first().is_some_and(|c| c.assignments.len() == train.len());
        if epoch >= warmup_epochs && !resumed {
            (self.levels, self.parents) = self.cluster(train, epoch)?;
            self.clustered_epoch = Some(epoch);
        }
        Ok(())
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, indices: &[usize], step: usize) -> Result<Tensor> {
        if self.levels.is_empty() {
            return Ok(self.moco.queries_and_loss(views, step)?.1); // warm-up
        }
        let (queries, keys) = self.moco.queries_and_keys(views)?;
        let queue = self.moco.queue_keys().clone();
        let temperature = self.moco.temperature();
        let mut instance_terms = Vec::new();
        let mut prototype_terms = Vec::new();
        for (l, level) in self.levels.iter().enumerate() {
            let assigned = level.assigned(indices, &self.device)?;
            let clusters = assigned.to_vec1::<u32>()?;
            let stream = |what: u64| mix_seed(&[self.seed, step as u64, l as u64, what]);
            // One draw of each selection per level, shared by the two views' queries.
            let keys_kept = self.select(&queue, level, &clusters, stream(0), (0.0, 0.999))?;
            let prototypes_kept = match (self.parents.get(l), self.levels.get(l + 1)) {
                (Some(parents), Some(upper)) => {
                    let parent_of_query: Vec<u32> = clusters.iter().map(|&c| parents[c as usize]).collect();
                    Some(self.select(&level.prototypes, upper, &parent_of_query, stream(1), (1e-4, 0.999))?)
                }
                _ => None,
            };
            for (v, q) in queries.iter().enumerate() {
                let positive_keys = &keys[1 - v];
                instance_terms.push(loss::info_nce::info_nce_with_selected_queue(
                    q,
                    positive_keys,
                    &queue,
                    &keys_kept,
                    temperature,
                )?);
                prototype_terms.push(proto_nce::selected_prototype_term(
                    q,
                    &level.prototypes,
                    &level.concentration,
                    &assigned,
                    prototypes_kept.as_ref(),
                )?);
            }
        }
        let mean = |terms: Vec<Tensor>| -> Result<Tensor> {
            let count = terms.len() as f64;
            Tensor::stack(&terms, 0)?.sum_all()? / count
        };
        mean(instance_terms)? + mean(prototype_terms)?
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
            buffers.extend(clustering_buffers("hcsc", epoch, &self.levels, &self.device)?);
            for (l, parents) in self.parents.iter().enumerate() {
                buffers.push((format!("hcsc.{l}.parents"), Tensor::new(parents.as_slice(), &self.device)?));
            }
        }
        Ok(buffers)
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        self.moco.load_buffers(buffers)?;
        if let Some((epoch, levels)) = load_clusterings("hcsc", buffers)? {
            self.parents = (0..levels.len().saturating_sub(1))
                .map(|l| buffers.get(&format!("hcsc.{l}.parents")).map(|t| t.to_vec1::<u32>()).transpose())
                .collect::<Result<Option<_>>>()?
                .unwrap_or_default();
            self.levels = levels;
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
    use crate::train::Model;

    fn model() -> Model {
        let method = MethodConfig::Hcsc {
            temperature: 0.2,
            queue_size: 32,
            momentum: 0.99,
            clusters: vec![6, 3],
            warmup_epochs: 0,
        };
        let mut config = TrainConfig::for_method(method, ImageShape::new(1, 28, 28));
        config.encoder = ResNetConfig { widths: vec![8, 16, 16], ..ResNetConfig::canonical(1) }.into();
        Model::new(&config, &Device::Cpu).unwrap()
    }

    #[test]
    fn levels_nest_and_survive_a_checkpoint() {
        let images: Vec<f32> = (0..16 * 784).map(|i| ((i * 7919 + i / 784 * 131) % 255) as f32 / 255.0).collect();
        let data = Dataset::new(images, vec![0; 16], ImageShape::new(1, 28, 28), vec!["x".into()]).unwrap();
        let mut a = model();
        a.method.before_epoch(&data, 0).unwrap();
        let buffers: std::collections::HashMap<_, _> = a.method.buffers().unwrap().into_iter().collect();
        let fine = buffers["hcsc.0.assignments"].to_vec1::<u32>().unwrap();
        let coarse = buffers["hcsc.1.assignments"].to_vec1::<u32>().unwrap();
        let parents = buffers["hcsc.0.parents"].to_vec1::<u32>().unwrap();
        assert_eq!((parents.len(), buffers["hcsc.1.prototypes"].dims()), (6, &[3usize, 64][..]));
        for (f, c) in fine.iter().zip(&coarse) {
            assert_eq!(parents[*f as usize], *c, "an image's coarse cluster is its fine cluster's parent");
        }
        let views: Vec<Tensor> =
            (0..2).map(|_| Tensor::rand(0f32, 1f32, (4, 1, 28, 28), &Device::Cpu).unwrap()).collect();
        let labels = Tensor::zeros(4, candle_core::DType::U32, &Device::Cpu).unwrap();
        let loss = a.method.loss(&views, &labels, &[0, 5, 9, 15], 0).unwrap();
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
        let grads = loss.backward().unwrap();
        let vars = a.varmap.data().lock().unwrap();
        assert!(vars
            .iter()
            .filter(|(n, _)| n.starts_with("encoder."))
            .any(|(_, v)| grads.get(v.as_tensor()).is_some()));
        drop(vars);

        let mut b = model();
        b.method.load_buffers(&buffers).unwrap();
        b.method.before_epoch(&data, 0).unwrap();
        let again: std::collections::HashMap<_, _> = b.method.buffers().unwrap().into_iter().collect();
        assert_eq!(again["hcsc.0.parents"].to_vec1::<u32>().unwrap(), parents);
        assert_eq!(again["hcsc.1.assignments"].to_vec1::<u32>().unwrap(), coarse);
    }
}
