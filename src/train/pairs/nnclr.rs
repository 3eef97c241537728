//! Nearest-neighbour positives, NNCLR (Dwibedi, Aytar, Tompson, Sermanet, Zisserman, "With a
//! Little Help from My Friends", ICCV 2021).
//!
//! A support set `Q` keeps the positives of past batches; each anchor's positive `p` is replaced
//! by its nearest neighbour there, a different image that the encoder already finds similar:
//!
//! ```text
//! NN(p, Q) = argmax_{q ∈ Q} p·q,   ℓ_a = −log( e^{a·NN(p)/τ} / (e^{a·NN(p)/τ} + Σ_{n ∈ N(a)} e^{a·n/τ}) )
//! ```
//!
//! The neighbour carries no gradient; the original positive leaves the anchor's sums. The paper
//! keeps 98,304 embeddings for ImageNet's 1.28 M images; the default here, 4,096, is the same
//! share of Fashion-MNIST's 60,000. Until the set has been filled once, the positives are kept.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};

use super::{Contrast, MemoryQueue};

/// The support set and the positives waiting to enter it after the optimiser step.
pub struct NearestNeighbourSupport {
    queue: MemoryQueue,
    /// Rows pushed so far, up to the size: the set is used once it is full of real embeddings.
    filled: usize,
    pending: Vec<Tensor>,
}

impl NearestNeighbourSupport {
    pub fn new(size: usize, dim: usize, device: &candle_core::Device) -> Result<Self> {
        Ok(Self { queue: MemoryQueue::new(size, dim, device)?, filled: 0, pending: Vec::new() })
    }

    /// Replaces each anchor's positives by the nearest neighbour of their centre.
    pub fn replace_positives(&mut self, contrast: &mut Contrast) -> Result<()> {
        let centres = contrast.positive_centres()?;
        self.pending.push(centres.to_dtype(DType::F32)?);
        if self.filled < self.queue.len() {
            return Ok(());
        }
        let support = self.queue.keys().to_dtype(centres.dtype())?;
        let nearest = centres.matmul(&support.t()?)?.argmax(1)?;
        let neighbours = support.index_select(&nearest, 0)?;
        contrast.replace_positives(&neighbours)
    }

    /// After the step: this step's positives enter the support set.
    pub fn after_step(&mut self) -> Result<()> {
        for rows in std::mem::take(&mut self.pending) {
            self.filled = (self.filled + rows.dims()[0]).min(self.queue.len());
            self.queue.push(&rows)?;
        }
        Ok(())
    }

    pub fn buffers(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let filled = Tensor::new(&[self.filled as u32], self.queue.keys().device())?;
        Ok(vec![(format!("{prefix}support"), self.queue.to_tensor()?), (format!("{prefix}support_filled"), filled)])
    }

    pub fn load_buffers(&mut self, prefix: &str, buffers: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(support) = buffers.get(&format!("{prefix}support")) {
            self.queue = MemoryQueue::from_tensor(support)?;
        }
        if let Some(filled) = buffers.get(&format!("{prefix}support_filled")) {
            self.filled = filled.to_vec1::<u32>()?[0] as usize;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_positive_becomes_its_nearest_support_embedding_once_the_set_is_full() -> Result<()> {
        let q = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu)?;
        let k = Tensor::new(&[[0.8f32, 0.6], [0.6, 0.8]], &Device::Cpu)?;
        let queue = Tensor::new(&[[-1.0f32, 0.0]], &Device::Cpu)?;
        let mut support = NearestNeighbourSupport::new(3, 2, &Device::Cpu)?;
        let mut c = Contrast::with_queue(&q, &k, &queue)?;
        support.replace_positives(&mut c)?;
        assert!(c.private.is_none(), "an unfilled set keeps the positives");
        support.after_step()?;
        assert_eq!(support.filled, 2);
        support.queue =
            MemoryQueue::from_tensor(&Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0], [-1.0, 0.0]], &Device::Cpu)?)?;
        support.filled = 3;
        // (0.8, 0.6)'s nearest support embedding is (1, 0), (0.6, 0.8)'s is (0, 1).
        let mut c = Contrast::with_queue(&q, &k, &queue)?;
        support.replace_positives(&mut c)?;
        let (private, weights) = c.private.clone().unwrap();
        let neighbours = private.squeeze(1)?.to_vec2::<f32>()?;
        assert_eq!(neighbours, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert_eq!(weights.to_vec2::<f32>()?, vec![vec![1.0], vec![1.0]]);
        // The original keys are out of both sums; the queue stays a negative.
        assert_eq!(c.denominator.to_vec2::<f32>()?, vec![vec![0., 0., 1.], vec![0., 0., 1.]]);
        assert_eq!(c.positives.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn checkpointed_support_restores() -> Result<()> {
        let mut support = NearestNeighbourSupport::new(2, 2, &Device::Cpu)?;
        support.pending.push(Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu)?);
        support.after_step()?;
        let saved: HashMap<_, _> = support.buffers("pairs.")?.into_iter().collect();
        let mut restored = NearestNeighbourSupport::new(2, 2, &Device::Cpu)?;
        restored.load_buffers("pairs.", &saved)?;
        assert_eq!(restored.filled, 1);
        assert_eq!(restored.queue.to_tensor()?.to_vec2::<f32>()?, support.queue.to_tensor()?.to_vec2::<f32>()?);
        Ok(())
    }
}
