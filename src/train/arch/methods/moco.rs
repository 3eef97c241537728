//! MoCo v2 (He et al. 2020, "Momentum Contrast"; Chen et al. 2020, "Improved Baselines"):
//! asynchronous symmetric.
//!
//! - query branch: encoder + MLP projector, trained by gradient;
//! - key branch: the same architecture, updated as `θ_k ← m θ_k + (1 − m) θ_q`, no gradient;
//! - pairs: the key of the other view is the positive, a FIFO queue of past keys the negatives;
//! - loss: InfoNCE against the queue, symmetrised over the two views (as in MoCo v2+/v3), or the
//!   run's instance loss, after the run's pair strategies ([`Contrast::with_queue`]);
//! - after each step: momentum update, then the batch's keys enter the queue.
//!
//! Shuffled batch norm on one device: batch-norm statistics shared by a query and its positive
//! key would let the model tell the current batch's keys from the queue's by their batch
//! signature instead of their content (MoCo, section 3.3). Queries are normalised in
//! [`BN_GROUPS`] groups of consecutive samples and keys in groups that take one sample from each
//! query group, as MoCo's per-GPU batches with shuffled keys.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::init::seeded_randn;
use crate::train::arch::{EmaPairs, Encoder, MlpConfig};
use crate::train::loss::{self, ContrastLoss};
use crate::train::pairs::{add_hardest_mixed_negatives, fnc, Contrast, MemoryQueue, PairPipeline, PairStrategy};

/// Separate batch-norm groups per view (MoCo used 8 GPUs; 4 groups keep each group large).
pub const BN_GROUPS: usize = 4;

pub struct MocoV2 {
    config: MethodConfig,
    temperature: f64,
    momentum: f64,
    query: Branch,
    key: Branch,
    ema: EmaPairs,
    queue: MemoryQueue,
    pending_keys: Option<Tensor>,
    loss: ContrastLoss,
    pairs: PairPipeline,
}

impl MocoV2 {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::MocoV2 { temperature, queue_size, momentum, loss, pairs } = &config else {
            candle_core::bail!("not a MoCo v2 config")
        };
        let (loss, pairs) = (loss.clone(), pairs.clone());
        Self::with(config.clone(), *temperature, *queue_size, *momentum, loss, &pairs, parts)
    }

    /// MoCo v2 with these settings, reporting `config` as its own (PCL builds on it).
    pub(super) fn with(
        config: MethodConfig,
        temperature: f64,
        queue_size: usize,
        momentum: f64,
        loss: ContrastLoss,
        pairs: &[PairStrategy],
        parts: &MethodParts,
    ) -> Result<Self> {
        // MoCo v2's projector has no batch norm.
        let projector = MlpConfig { hidden_batch_norm: false, ..parts.projector_config() };
        let query = parts.branch(&projector)?;
        let (key, ema) = parts.target_branch(&projector)?;
        // MoCo starts the queue with random unit vectors; drawn from the seed so runs repeat.
        let random = seeded_randn(queue_size, projector.out_dim(), parts.seed, "buffer.queue", parts.vb.device())?;
        let queue = MemoryQueue::from_tensor(&loss::l2_normalize(&random)?)?;
        let pairs = PairPipeline::new(pairs, projector.out_dim(), parts.seed, parts.vb.device())?;
        Ok(Self { config, temperature, momentum, query, key, ema, queue, pending_keys: None, loss, pairs })
    }
}

impl Method for MocoV2 {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _indices: &[usize], step: usize) -> Result<Tensor> {
        Ok(self.queries_and_loss(views, step)?.1)
    }

    fn after_step(&mut self, _progress: f64) -> Result<()> {
        self.pairs.after_step()?;
        self.ema.update(self.momentum)?;
        if let Some(keys) = self.pending_keys.take() {
            self.queue.push(&loss::l2_normalize(&keys)?)?;
        }
        Ok(())
    }

    fn encoder(&self) -> &Encoder {
        &self.query.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.query.encoder
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut buffers = vec![("queue".to_string(), self.queue.to_tensor()?)];
        buffers.extend(self.pairs.buffers()?);
        Ok(buffers)
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(queue) = buffers.get("queue") {
            self.queue = MemoryQueue::from_tensor(queue)?;
        }
        self.pairs.load_buffers(buffers)
    }
}

impl MocoV2 {
    /// The momentum branch (PCL clusters its projections).
    pub(super) fn key_branch(&self) -> &Branch {
        &self.key
    }

    /// Each view's queries `[N, D]` and the symmetrised loss against the queue. Views beyond the
    /// first two are support views (FNC), projected by the key branch.
    pub(super) fn queries_and_loss(&mut self, views: &[Tensor], step: usize) -> Result<(Vec<Tensor>, Tensor)> {
        let (q, k) = self.queries_and_keys(&views[..2])?;
        let support = match views.len() > 2 {
            true => {
                let groups = BN_GROUPS.min(views[0].dim(0)?);
                let z = self.key.project_views_grouped(&views[2..], groups, None)?;
                Some(fnc::support_of_anchors(&z, 1)?)
            }
            false => None,
        };
        let queue = self.queue.keys().clone();
        let n = views[0].dim(0)?;
        let as_negatives = self.pairs.mixed_negatives();
        let mixed = match self.pairs.mixing(n, step)? {
            Some(mixing) => {
                // MixCo's mixes are queries; Mixup's are negatives, so keys (no gradient).
                let branch = if as_negatives.is_some() { &self.key } else { &self.query };
                let images = [mixing.mix_images(&views[0])?];
                let projected = branch.project_views_grouped(&images, BN_GROUPS.min(n), None)?.remove(0);
                Some((mixing, projected))
            }
            None => None,
        };
        let mut terms = Vec::with_capacity(2);
        for (query, key) in [(0, 1), (1, 0)] {
            let mut contrast = Contrast::with_queue(&q[query], &k[key], &queue)?;
            match (&mixed, as_negatives) {
                (Some((mixing, keys)), Some(hardest)) => add_hardest_mixed_negatives(
                    &mut contrast,
                    mixing,
                    &keys.detach(),
                    &(0..n).collect::<Vec<_>>(),
                    hardest,
                )?,
                (Some((mixing, queries)), None) if query == 0 => {
                    // MixCo: mixed first views against the second view's keys (columns 0..N) and the queue.
                    let negatives: Vec<f64> = (0..n + queue.dims()[0]).map(|j| if j < n { 0.0 } else { 1.0 }).collect();
                    mixing.add_anchors(&mut contrast, queries, &(0..n).collect::<Vec<_>>(), &negatives)?;
                }
                _ => {}
            }
            contrast.support = support.clone();
            self.pairs.apply(&mut contrast, step)?;
            terms.push(self.loss.loss(&contrast, self.temperature)?);
        }
        Ok((q, ((&terms[0] + &terms[1])? / 2.0)?))
    }

    /// Each view's queries and (detached) keys; the keys enter the queue after the step.
    pub(super) fn queries_and_keys(&mut self, views: &[Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let n = views[0].dim(0)?;
        let groups = BN_GROUPS.min(n);
        let q = self.query.project_views_grouped(views, groups, None)?;
        let shuffle = interleave_groups(n, groups, views[0].device())?;
        let k: Vec<Tensor> =
            self.key.project_views_grouped(views, groups, Some(&shuffle))?.iter().map(Tensor::detach).collect();
        self.pending_keys = Some(Tensor::cat(&k, 0)?);
        Ok((q, k))
    }

    /// The queue's keys `[K, D]`, unit vectors.
    pub(super) fn queue_keys(&self) -> &Tensor {
        self.queue.keys()
    }

    pub(super) fn temperature(&self) -> f64 {
        self.temperature
    }
}

/// The permutation that deals samples `0..n` into `groups` groups round-robin, so that each key
/// group holds samples from every query group (`[0, g, 2g, …, 1, g+1, …]`), and its inverse.
pub fn interleave_groups(n: usize, groups: usize, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
    let order: Vec<u32> = (0..groups).flat_map(|g| (g..n).step_by(groups)).map(|i| i as u32).collect();
    let mut inverse = vec![0u32; n];
    for (position, &i) in order.iter().enumerate() {
        inverse[i as usize] = position as u32;
    }
    Ok((Tensor::new(order, device)?, Tensor::new(inverse, device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaving_takes_one_sample_from_each_consecutive_group_and_inverts() -> Result<()> {
        let (order, inverse) = interleave_groups(8, 4, &candle_core::Device::Cpu)?;
        // Query groups are {0,1}, {2,3}, {4,5}, {6,7}; key groups {0,4}, {1,5}, {2,6}, {3,7}.
        assert_eq!(order.to_vec1::<u32>()?, vec![0, 4, 1, 5, 2, 6, 3, 7]);
        let x = Tensor::arange(0u32, 8, &candle_core::Device::Cpu)?;
        let back = x.index_select(&order, 0)?.index_select(&inverse, 0)?;
        assert_eq!(back.to_vec1::<u32>()?, (0..8).collect::<Vec<u32>>());
        Ok(())
    }
}
